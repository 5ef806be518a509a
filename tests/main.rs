mod harness;
mod pipeline;
mod support;
