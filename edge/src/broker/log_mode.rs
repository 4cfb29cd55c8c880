//! Log mode, for the cloud node: what clients publish goes to a log first and reaches
//! subscribers when it is read back (see [`Broker::use_log`]).

use std::sync::Arc;

use super::{Broker, Message};

impl Broker {
    /// Log mode (the cloud node): a message a client publishes (or a will) is not routed but
    /// kept for [`Broker::take_appends`]; the driver appends it to the log before it sends the
    /// batch's acknowledgements, and feeds what the log holds back as [`Input::Deliver`](super::Input::Deliver).
    /// Every source of messages thus reaches subscribers through the same path.
    pub fn use_log(&mut self) {
        self.log = Some(Vec::new());
    }

    /// Log mode: the messages accepted since the last call, in order. The driver must make
    /// them durable before it sends the packets of the same batch.
    pub fn take_appends(&mut self) -> Vec<Arc<Message>> {
        self.log.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Log mode: deliveries held for a subscriber without room. While there are any, the
    /// driver should stop reading the log.
    pub fn deliveries_held(&self) -> usize {
        self.held_deliveries.len()
    }
}
