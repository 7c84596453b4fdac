//! placeholder
/// placeholder
#[derive(Debug, Default)]
pub struct Brokers;
