//! The channel pair between the uplink and the command service.
//!
//! A leaf module, so that neither side imports the other: the uplink hands each command
//! publish over as a [`CommandDelivery`] and sends its PUBACK only when the command service
//! asks with an [`AckRequest`], after the command is durably recorded. The lifecycle creates
//! both bounded channels and gives the uplink its [`CommandLink`] end.

use rumqttc::Publish;
use tokio::sync::mpsc;

/// A command publish received in connection epoch `epoch`, not yet acknowledged.
#[derive(Debug)]
pub struct CommandDelivery {
    pub epoch: u64,
    pub publish: Publish,
}

/// The command service's request to PUBACK a delivery it has durably recorded. Ignored if the
/// epoch has ended meanwhile: the broker then redelivers on the next connection.
#[derive(Debug)]
pub struct AckRequest {
    pub epoch: u64,
    pub publish: Publish,
}

/// The uplink's side of the command channel.
pub struct CommandLink {
    pub deliveries: mpsc::Sender<CommandDelivery>,
    pub acks: mpsc::Receiver<AckRequest>,
}
