mod connection;
mod request;
mod task;
