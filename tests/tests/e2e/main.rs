//! End-to-end tests: real gRPC over real sockets, real receivers on 127.0.0.1, SQLite files and
//! PostgreSQL databases made per test.

mod api;
mod cli;
mod clients;
mod console;
mod delivery;
mod deploy;
mod dispatch;
mod lifecycle;
mod observability;
mod operations;
mod pipeline;
mod scale;
mod setup;
mod storage_faults;
mod tls;
