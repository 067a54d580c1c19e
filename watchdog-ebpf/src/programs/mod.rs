pub mod connection;
pub mod request;
mod syscalls;
mod task;
