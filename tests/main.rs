mod catchup;
mod demo;
mod deploy_files;
mod harness;
mod operator;
mod pipeline;
mod support;
mod tls;
