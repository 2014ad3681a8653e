//! ktern: single-threaded stand-ins for the `std::sync::{Arc, Mutex}` that
//! share a connection's stream state with its stream handles.
//!
//! ktern runs each connection on one thread for its whole life (a monoio
//! runtime per CPU; nothing of h2 crosses threads), so the atomic reference
//! counts and the futex lock taken around every stream operation bought
//! nothing there: they were about 5% of a proxied HTTP/2 request's CPU
//! (`perf`, `bench/README.md`). `Rc` and a `RefCell` do the same without
//! atomics, and make the handles `!Send`, so the compiler refuses any use
//! across threads.

use std::cell::{RefCell, RefMut};

pub(crate) use std::rc::Rc as Arc;

/// A `RefCell` with `std::sync::Mutex`'s `lock`. Where the mutex would
/// deadlock (the state locked again further down the same call chain),
/// `lock` returns an error instead, which h2's callers treat as a poisoned
/// lock (a panic, or nothing during unwinding).
#[derive(Debug)]
pub(crate) struct Mutex<T>(RefCell<T>);

/// The state is already borrowed.
#[derive(Debug)]
pub(crate) struct Locked;

impl<T> Mutex<T> {
    pub(crate) fn new(value: T) -> Mutex<T> {
        Mutex(RefCell::new(value))
    }

    pub(crate) fn lock(&self) -> Result<RefMut<'_, T>, Locked> {
        self.0.try_borrow_mut().map_err(|_| Locked)
    }
}
