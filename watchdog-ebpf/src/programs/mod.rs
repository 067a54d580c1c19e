pub mod abi;
mod adopt;
pub mod connection;
pub mod h2;
pub mod head;
pub mod request;
mod syscalls;
mod task;
