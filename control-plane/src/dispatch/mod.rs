//! Long-lived delivery loops: the scheduler that leases due deliveries to agents and records
//! their results, the registry of connected agents, and (PostgreSQL, several replicas) the
//! tasks that share agents and recorded attempts between replicas.

pub mod changes;
mod jobs;
pub mod model;
pub mod presence;
pub mod registry;
mod results;
pub mod scheduler;
pub mod watch;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::domain::model::Delivery;

pub use scheduler::Command;

/// Called with deliveries committed just now, before they are handed to the scheduler;
/// returning false drops the hand-off, as a crash at that point would (tests use it).
pub type HandoffHook = std::sync::Arc<dyn Fn(&[Delivery]) -> bool + Send + Sync>;

/// An event's payload and trace context as published: handed to the scheduler with the event's
/// deliveries, so their jobs are built without reading the event back.
#[derive(Debug)]
pub struct EventBody {
    pub payload: Bytes,
    pub traceparent: Option<String>,
}

/// The bodies of the events of a hand-off, by event id.
pub type EventBodies = HashMap<String, Arc<EventBody>>;

/// How many commands wait for the scheduler at most. When full, hand-offs are dropped (the
/// poller finds their deliveries) and everything else waits.
pub const COMMAND_QUEUE: usize = 16_384;

/// A cheap handle to the scheduler.
#[derive(Clone)]
pub struct Handle {
    commands: mpsc::Sender<Command>,
    handoff_hook: Option<HandoffHook>,
}

impl Handle {
    pub fn new(commands: mpsc::Sender<Command>, handoff_hook: Option<HandoffHook>) -> Self {
        Self {
            commands,
            handoff_hook,
        }
    }

    /// Hands deliveries committed just now, with their events' bodies, to the scheduler (no
    /// polling needed for them).
    pub fn submit(&self, deliveries: Vec<Delivery>, bodies: EventBodies) {
        if self
            .handoff_hook
            .as_ref()
            .is_some_and(|hook| !hook(&deliveries))
        {
            return;
        }
        // A full queue (a stalled scheduler) drops the hand-off: the deliveries are committed,
        // and the poller finds them.
        if !deliveries.is_empty() {
            let _ = self
                .commands
                .try_send(Command::Submit { deliveries, bodies });
        }
    }

    /// Tells the scheduler a subscription changed (its cached copy is stale).
    pub async fn subscription_changed(&self, id: &str) {
        self.send(Command::SubscriptionChanged(id.to_owned())).await;
    }

    /// Asks the scheduler to look for due work now.
    pub async fn wake(&self) {
        self.send(Command::Wake).await;
    }

    /// Sends a command, waiting while the queue is full; false once the scheduler is gone.
    pub(crate) async fn send(&self, command: Command) -> bool {
        self.commands.send(command).await.is_ok()
    }
}
