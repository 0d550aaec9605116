//! The channel that carries the scripts' actions (sends and publishes) to the
//! shards, with a bell the relay hangs on it.
//!
//! A shard whose input is steady waits on its sockets itself rather than on
//! its executor, and does not see a channel it is not polling until it looks
//! again. So after a worker queues an action it rings the bell, and the relay
//! has set the bell to wake its shards.

use std::fmt;
use std::sync::{Arc, RwLock};

use crate::event::Action;

/// What the relay runs after an action is queued (from the worker's thread).
pub type Ring = Arc<dyn Fn() + Send + Sync>;

#[derive(Clone, Default)]
struct Bell(Arc<RwLock<Option<Ring>>>);

impl Bell {
    fn ring(&self) {
        if let Ok(r) = self.0.read()
            && let Some(ring) = r.as_ref()
        {
            ring();
        }
    }
}

impl fmt::Debug for Bell {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hung = self.0.read().is_ok_and(|r| r.is_some());
        f.debug_struct("Bell").field("hung", &hung).finish()
    }
}

/// A bounded channel of actions holding at most `capacity` (at least 1).
pub fn channel(capacity: usize) -> (ActionSender, ActionReceiver) {
    let (tx, rx) = async_channel::bounded(capacity.max(1));
    let bell = Bell::default();
    (
        ActionSender {
            tx,
            bell: bell.clone(),
        },
        ActionReceiver { rx, bell },
    )
}

/// The workers' end.
#[derive(Debug, Clone)]
pub struct ActionSender {
    tx: async_channel::Sender<Action>,
    bell: Bell,
}

impl ActionSender {
    /// Queues `action` and rings the bell; gives the action back when the
    /// channel is full or every receiver is gone.
    pub fn try_send(&self, action: Action) -> Result<(), Action> {
        self.tx.try_send(action).map_err(|e| e.into_inner())?;
        self.bell.ring();
        Ok(())
    }
}

/// The shards' end (any shard may pull; executor-agnostic).
#[derive(Debug, Clone)]
pub struct ActionReceiver {
    rx: async_channel::Receiver<Action>,
    bell: Bell,
}

impl ActionReceiver {
    /// The next action; an error once every sender is gone and the channel is
    /// empty.
    pub async fn recv(&self) -> Result<Action, async_channel::RecvError> {
        self.rx.recv().await
    }

    /// The next action if one is queued.
    pub fn try_recv(&self) -> Result<Action, async_channel::TryRecvError> {
        self.rx.try_recv()
    }

    /// Actions queued now.
    pub fn len(&self) -> usize {
        self.rx.len()
    }

    /// No action is queued.
    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }

    /// Sets what runs after each action is queued (`None`: nothing),
    /// replacing what was set before.
    pub fn on_send(&self, ring: Option<Ring>) {
        if let Ok(mut slot) = self.bell.0.write() {
            *slot = ring;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn send(dst: &str) -> Action {
        Action::Send {
            dst: dst.into(),
            payload: bytes::Bytes::from_static(b"x"),
            json: false,
        }
    }

    #[test]
    fn the_bell_rings_once_per_queued_action_and_not_for_a_refused_one() {
        let (tx, rx) = channel(2);
        let rung = Arc::new(AtomicUsize::new(0));
        let r = rung.clone();
        rx.on_send(Some(Arc::new(move || {
            r.fetch_add(1, Ordering::SeqCst);
        })));
        assert!(tx.try_send(send("a")).is_ok());
        assert!(tx.try_send(send("b")).is_ok());
        assert!(tx.try_send(send("c")).is_err(), "full");
        assert_eq!(rung.load(Ordering::SeqCst), 2);
        assert!(matches!(rx.try_recv(), Ok(Action::Send { dst, .. }) if dst == "a"));
        rx.on_send(None);
        assert!(tx.try_send(send("d")).is_ok());
        assert_eq!(rung.load(Ordering::SeqCst), 2, "taken down: not rung");
    }

    #[test]
    fn without_a_bell_actions_still_flow() {
        let (tx, rx) = channel(0);
        assert!(tx.try_send(send("a")).is_ok());
        assert!(rx.try_recv().is_ok());
        drop(tx);
        assert!(rx.try_recv().is_err());
    }
}
