//! Long-lived delivery loops: the scheduler that leases due deliveries to agents and records
//! their results, and the registry of connected agents.

pub mod registry;
pub mod scheduler;

use tokio::sync::mpsc;

use crate::domain::model::Delivery;

pub use scheduler::Command;

/// A cheap handle to the scheduler.
#[derive(Clone)]
pub struct Handle {
    commands: mpsc::UnboundedSender<Command>,
}

impl Handle {
    pub fn new(commands: mpsc::UnboundedSender<Command>) -> Self {
        Self { commands }
    }

    /// Hands deliveries committed just now to the scheduler (no polling needed for them).
    pub fn submit(&self, deliveries: Vec<Delivery>) {
        if !deliveries.is_empty() {
            let _ = self.commands.send(Command::Submit(deliveries));
        }
    }

    /// Tells the scheduler a subscription changed (its cached copy is stale).
    pub fn subscription_changed(&self, id: &str) {
        let _ = self
            .commands
            .send(Command::SubscriptionChanged(id.to_owned()));
    }

    /// Asks the scheduler to look for due work now.
    pub fn wake(&self) {
        let _ = self.commands.send(Command::Wake);
    }

    pub(crate) fn send(&self, command: Command) -> bool {
        self.commands.send(command).is_ok()
    }
}
