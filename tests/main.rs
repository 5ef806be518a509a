mod catchup;
mod demo;
mod harness;
mod pipeline;
mod support;
