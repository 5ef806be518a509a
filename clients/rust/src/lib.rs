//! walcast client (work in progress).
