//! Herald's end-to-end test harness: control planes in-process or as child processes, on a
//! fresh SQLite file or a fresh PostgreSQL database, recording receivers on 127.0.0.1, and
//! deadline-bounded waits instead of sleeps.

pub mod harness;
pub mod pki;
pub mod receiver;
pub mod wait;

pub use harness::{Backend, Herald, HeraldBuilder, TestDatabase};
pub use receiver::{Received, Receiver};
pub use wait::eventually;
