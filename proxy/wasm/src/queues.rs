//! Shared queues (`proxy_register_shared_queue` and friends), as in Envoy: a queue is named
//! by (vm id, name); the instance that registered it last owns it (so the instance of a
//! chain swapped in takes over its queues), and every enqueue calls `proxy_on_queue_ready`
//! on the owner's root context, on the owner's worker thread.

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, OnceLock};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// Most items a queue holds; enqueueing into a full queue drops the oldest item.
const QUEUE_LIMIT: usize = 10_000;

/// One queue.
struct Queue {
    /// Items, oldest first.
    items: VecDeque<Vec<u8>>,
    /// The owner's worker, slot and root context.
    owner: (UnboundedSender<Ready>, usize, u32),
}

/// Every queue of the process.
#[derive(Default)]
struct Registry {
    /// Tokens by (vm id, name).
    tokens: HashMap<(String, Vec<u8>), u32>,
    /// Index `token - 1`.
    queues: Vec<Queue>,
}

/// A queue-ready notification: the owner's slot, its root context, the queue's token.
pub type Ready = (usize, u32, u32);

/// The process-wide registry.
fn registry() -> &'static Mutex<Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

thread_local! {
    /// This worker's end of the queue-ready channel.
    static READY_TX: RefCell<Option<UnboundedSender<Ready>>> = const { RefCell::new(None) };
}

/// Creates the calling worker's queue-ready channel (once) and returns its receiver, which
/// the caller drains on this thread.
pub fn install_worker_channel() -> Option<UnboundedReceiver<Ready>> {
    READY_TX.with(|tx| {
        let mut tx = tx.borrow_mut();
        if tx.is_some() {
            return None;
        }
        let (sender, receiver) = unbounded_channel();
        *tx = Some(sender);
        Some(receiver)
    })
}

/// Registers the queue `name` of `vm_id`, or takes over the one registered before: either
/// way root context `context` of the instance in `slot` on the calling worker owns it now
/// (as in Envoy, the last registrant owns it). `None` when the calling thread is not a
/// worker.
pub fn register(vm_id: &str, name: &[u8], slot: usize, context: u32) -> Option<u32> {
    let sender = READY_TX.with(|tx| tx.borrow().clone())?;
    let mut reg = registry().lock().ok()?;
    let key = (vm_id.to_owned(), name.to_vec());
    if let Some(token) = reg.tokens.get(&key).copied() {
        if let Some(q) = reg.queues.get_mut(token as usize - 1) {
            q.owner = (sender, slot, context);
        }
        return Some(token);
    }
    reg.queues.push(Queue {
        items: VecDeque::new(),
        owner: (sender, slot, context),
    });
    let token = reg.queues.len() as u32;
    reg.tokens.insert(key, token);
    Some(token)
}

/// The token of queue `name` of `vm_id`, if registered.
pub fn resolve(vm_id: &str, name: &[u8]) -> Option<u32> {
    let reg = registry().lock().ok()?;
    reg.tokens.get(&(vm_id.to_owned(), name.to_vec())).copied()
}

/// Appends `item`; false when there is no such queue.
pub fn enqueue(token: u32, item: Vec<u8>) -> bool {
    let Ok(mut reg) = registry().lock() else {
        return false;
    };
    let Some(q) = (token as usize)
        .checked_sub(1)
        .and_then(|i| reg.queues.get_mut(i))
    else {
        return false;
    };
    if q.items.len() >= QUEUE_LIMIT {
        q.items.pop_front();
    }
    q.items.push_back(item);
    // The owner's worker may be gone (draining); the item stays for a later dequeue.
    let _ = q.owner.0.send((q.owner.1, q.owner.2, token));
    true
}

/// What a dequeue found.
#[derive(Debug, PartialEq, Eq)]
pub enum Dequeued {
    /// The oldest item.
    Item(Vec<u8>),
    /// The queue is empty.
    Empty,
    /// There is no queue with that token.
    NoSuchQueue,
}

/// Takes the oldest item.
pub fn dequeue(token: u32) -> Dequeued {
    let Ok(mut reg) = registry().lock() else {
        return Dequeued::NoSuchQueue;
    };
    match (token as usize)
        .checked_sub(1)
        .and_then(|i| reg.queues.get_mut(i))
    {
        None => Dequeued::NoSuchQueue,
        Some(q) => q.items.pop_front().map_or(Dequeued::Empty, Dequeued::Item),
    }
}
