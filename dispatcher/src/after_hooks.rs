//! After-sync hooks: command or webhook targets that follow another target get what
//! reached it, from the delivery stream, as their work.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use protocol::bus;
use protocol::seq::{Seen, SeqTracker};
use protocol::stage::StageError;
use protocol::wire;

use crate::routing::Served;
use crate::worker::Job;

/// How long stopping hooks wait for the last deliveries of the targets they follow.
pub(crate) const HOOK_SETTLE: Duration = Duration::from_millis(300);

/// After-sync hooks: what reached a target they follow becomes their work (paths as
/// upserts, compared subtrees as resyncs). A delivery the hook cannot vouch for having
/// seen (first message, gap, restarted dispatcher) makes it resync the root: `./`.
pub(crate) fn forward_deliveries(
    delivered: &zmq::Socket,
    hooks: &HashMap<String, Vec<(Vec<String>, Served)>>,
    trackers: &mut HashMap<String, SeqTracker>,
) -> Result<(), StageError> {
    use protocol::wire::{Change, Delivery, Op};
    while let Some((_, payload)) = bus::try_recv(delivered)? {
        let Ok(d) = wire::decode::<Delivery>(&payload) else {
            tracing::warn!("undecodable delivery message ignored");
            continue;
        };
        let Some(list) = hooks.get(&d.target) else {
            continue;
        };
        let seen = trackers
            .entry(d.target.clone())
            .or_default()
            .observe(d.epoch, d.seq);
        let root: Arc<str> = d.root.as_str().into();
        let served = list.iter().filter(|(roots, _)| roots.contains(&d.root));
        if seen != Seen::InOrder {
            // What was missed may have been about any root the hook shares with the
            // target it follows, not only this message's.
            tracing::info!(target = %d.target, "delivery stream (re)joined; hooks after it resync their roots");
            for (roots, s) in list {
                for r in roots {
                    let _ = s.tx.send(Job::Resync {
                        root: r.as_str().into(),
                    });
                }
            }
        }
        if !d.ok {
            continue;
        }
        let change = |op, path: protocol::PathBytes, since_us| Change {
            op,
            path,
            from: None,
            dir: false,
            recursive: false,
            since_us,
        };
        let mut changes: Vec<Change> = d
            .paths
            .into_iter()
            .map(|p| change(Op::Upsert, p.path, p.since_us))
            .collect();
        changes.extend(d.resyncs.into_iter().map(|r| change(Op::Resync, r, 0)));
        let changes = Arc::new(changes);
        for (_, s) in served {
            // A hook follows deliveries, not the change stream: it vouches for no
            // time, so `syncbus run` keeps no crash checkpoint beside hooks.
            let _ = s.tx.send(Job::Changes {
                root: root.clone(),
                changes: changes.clone(),
                floor_us: 0,
                safe_us: 0,
            });
        }
    }
    Ok(())
}
