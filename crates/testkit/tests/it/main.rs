//! Coordinator and workers together over real sockets on 127.0.0.1.

mod faults;
mod frames;
mod lifecycle;
mod recovery;
