mod catchup;
mod demo;
mod harness;
mod operator;
mod pipeline;
mod support;
