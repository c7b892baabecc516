//! Macros shared by the crate's services.

/// `get_ref`, `get_mut` and `into_inner` for a service wrapping `inner: S`,
/// as tower-http's middleware have them.
macro_rules! inner_service_accessors {
    () => {
        /// The wrapped service.
        pub fn get_ref(&self) -> &S {
            &self.inner
        }

        /// The wrapped service, mutably.
        pub fn get_mut(&mut self) -> &mut S {
            &mut self.inner
        }

        /// The wrapped service, consuming this one.
        pub fn into_inner(self) -> S {
            self.inner
        }
    };
}
