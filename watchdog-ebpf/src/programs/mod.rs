pub mod abi;
pub mod connection;
pub mod h2;
pub mod head;
pub mod request;
mod syscalls;
mod task;
