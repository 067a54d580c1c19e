mod connection;
mod request;
mod syscalls;
mod task;
