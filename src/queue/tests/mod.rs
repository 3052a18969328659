//! Tests of the state machine, by topic: dispatch and delivery
//! (`dispatch`), a property test against a reference model of the delivery
//! rules (`model`), request ids, de-duplication and completion
//! (`request_ids`), decoding bounds (`decoding`), byte and dead-letter
//! limits (`limits`), leader housekeeping (`housekeeping`), and entries
//! coalesced by the leader (`coalescing`). This file
//! holds what they share: a harness that applies commands to one state.

mod coalescing;
mod decoding;
mod dispatch;
mod housekeeping;
mod limits;
mod memory;
mod model;
mod request_ids;

use bytes::Bytes;

use super::*;

/// The input queue of service "svc".
fn input() -> QueueRef {
    QueueRef::new("svc", QueueKind::Input)
}

/// One state, the clock and ids of the commands applied to it, and the
/// events they emitted.
struct Harness {
    state: QueueState,
    next_id: u128,
    now: u64,
    events: Vec<Event>,
}

impl Harness {
    /// A service "svc" with the input queue's `limits` and `max_delivery`.
    fn with_input_limits(limits: QueueLimits, max_delivery: u32) -> Self {
        Self::new(ServiceConfig {
            input: limits,
            max_delivery,
            ..Default::default()
        })
    }

    fn new(config: ServiceConfig) -> Self {
        let mut h = Harness {
            state: QueueState::new(),
            next_id: 1,
            now: 1_000,
            events: Vec::new(),
        };
        assert_eq!(
            h.run(Command::CreateService {
                name: "svc".into(),
                config
            }),
            Reply::Done
        );
        h
    }

    fn run(&mut self, command: Command) -> Reply {
        self.next_id += 1;
        let (reply, events) = self.state.apply(&Envelope {
            id: self.next_id,
            now_ms: self.now,
            command,
        });
        self.events.extend(events);
        reply
    }

    fn put(&mut self, data: &str, priority: u32) -> u64 {
        let item = NewItem {
            request_id: format!("r-{data}"),
            tags: Tags::new(),
            data: Bytes::from(data.to_string()),
            priority,
            path: String::new(),
        };
        match self.run(Command::Put {
            queue: input(),
            item,
        }) {
            Reply::Put { index, .. } => index,
            other => panic!("put failed: {other:?}"),
        }
    }

    fn attach(&mut self, group: &str, user: &str, connection: u64, window: u32, auto_commit: bool) {
        let consumer = ConsumerSpec {
            group: group.into(),
            user: user.into(),
            node: 1,
            connection,
            window,
            auto_commit,
            index_only: false,
            tags: Tags::new(),
            start_index: Some(0),
        };
        assert_eq!(
            self.run(Command::Attach {
                queue: input(),
                consumer
            }),
            Reply::Done
        );
    }

    /// Indexes delivered to `connection` since the last call.
    fn delivered(&mut self, connection: u64) -> Vec<u64> {
        self.delivered_counts(connection)
            .into_iter()
            .map(|(index, _)| index)
            .collect()
    }

    /// The deliveries over `connection` since the last look, as (index,
    /// count of deliveries the frame reports).
    fn delivered_counts(&mut self, connection: u64) -> Vec<(u64, u32)> {
        let mut out = Vec::new();
        self.events.retain(|e| match e {
            Event::Deliver {
                connection: c,
                frame,
                ..
            } if *c == connection => {
                out.push((frame.index, frame.deliveries));
                false
            }
            _ => true,
        });
        out
    }

    fn queue(&self) -> &Queue {
        self.state.queue(&input()).unwrap()
    }

    /// Put an item of `size` bytes; the reply as it came.
    fn put_sized(&mut self, size: usize) -> Reply {
        let item = NewItem {
            request_id: format!("r{}", self.next_id),
            tags: Tags::new(),
            data: Bytes::from(vec![b'x'; size]),
            priority: 0,
            path: String::new(),
        };
        self.run(Command::Put {
            queue: input(),
            item,
        })
    }

    fn commit(&mut self, group: &str, indexes: Vec<u64>) {
        self.run(Command::Commit {
            queue: input(),
            group: group.into(),
            indexes,
        });
    }
}

fn sink() -> QueueRef {
    QueueRef::new("svc", QueueKind::Sink)
}

fn item(request_id: &str, data: &str) -> NewItem {
    NewItem {
        request_id: request_id.into(),
        tags: Tags::new(),
        data: Bytes::from(data.to_string()),
        priority: 0,
        path: String::new(),
    }
}

fn take_all() -> Selector {
    Selector {
        from_index: Some(0),
        length: 10_000,
        tags: Tags::new(),
    }
}
