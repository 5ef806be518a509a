mod catchup;
mod harness;
mod pipeline;
mod support;
