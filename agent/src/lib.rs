//! Herald delivery agent.
