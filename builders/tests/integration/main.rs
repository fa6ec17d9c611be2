//! Integration tests of the executor against real services: dockerd (which
//! must be running: `cargo xtask test` starts it) and a CNCF Distribution
//! registry (`docker-registry`, started here on a free port), and the agent
//! against an in-process fake build manager.

mod agent;
mod docker;
mod harness;
