//! Staged rollouts with automatic rollback.
//!
//! A rollout holds a new version of some Chain and FilterConfig resources (its *overlay*)
//! and moves it onto a growing share of the proxies it changes, step by step, comparing the
//! golden metrics of the proxies that run it (the canary) with the others' (the baseline).
//!
//! Why a share of the proxies rather than a weighted split of each proxy's traffic between
//! two chain versions: a proxy never holds both versions (no second set of filter instances
//! on every worker, no per-request choice), the two versions' metrics are told apart by who
//! reported them with no per-request label, and any resource (a chain, a filter's config, a
//! module build) rolls out the same way. The price is granularity: a step moves whole
//! proxies, so with few proxies the first step is one proxy's share of the traffic.
//!
//! The steps: the proxies the overlay changes (those connected when it starts or moves on)
//! are ordered by a hash of the rollout's id and theirs; a step of `p` % gives the first
//! `ceil(p × n / 100)` (at least one) the overlay ([`Rollouts::overlay_for`], read when
//! their snapshots are made). The step goes live once every connected proxy of the share
//! ACKed it; after `interval_ms` live, [`decide`] compares the canary's traffic (reports that
//! cover only time after the step went live) with the baseline's (at the last step, the
//! step before's): promote, wait for traffic (for a while), or roll back. A NACK from the
//! share at any time, or a share that does not go live in time, rolls back at once. After
//! the last step the overlay is applied as an ordinary config change, so every proxy keeps
//! running what it runs (an abort is refused from then on).
//!
//! Rollouts live in memory: a restart of the service ends one by rolling it back (the stored
//! resources are still the old version).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use sha2::{Digest, Sha256};

use crate::model::{Kind, Resource, now_ms};
use crate::state::{ControlError, ControlState, Overlay};
use crate::stats::Sample;

/// The steps when a rollout names none, in percent.
pub const DEFAULT_STEPS: [u32; 3] = [10, 50, 100];
/// The step length when a rollout names none, ms.
pub const DEFAULT_INTERVAL_MS: u64 = 30_000;
/// The error-rate gate when a rollout names none.
pub const DEFAULT_MAX_ERROR_RATE: f64 = 0.01;
/// The requests a step needs when a rollout names none.
pub const DEFAULT_MIN_REQUESTS: u64 = 20;
/// Rollouts kept in the history.
const HISTORY: usize = 50;

/// How a rollout moves and what it checks.
#[derive(Clone, Debug, PartialEq)]
pub struct Gates {
    /// Shares of the proxies, in percent, increasing, the last 100.
    pub steps: Vec<u32>,
    /// How long a step runs live before it is judged, ms.
    pub interval_ms: u64,
    /// The error rate the canary may add over the baseline's (its own without one).
    pub max_error_rate: f64,
    /// The canary's largest p99, ms; 0: none.
    pub max_p99_ms: f64,
    /// Requests the canary must answer in a step to be promoted.
    pub min_requests: u64,
}

impl Gates {
    /// Gates from a request's fields (zero: the default), checked.
    pub fn new(
        steps: Vec<u32>,
        interval_ms: u64,
        max_error_rate: f64,
        max_p99_ms: f64,
        min_requests: u64,
    ) -> Result<Self, String> {
        let steps = if steps.is_empty() {
            DEFAULT_STEPS.to_vec()
        } else {
            steps
        };
        if steps.iter().any(|&s| s == 0 || s > 100) {
            return Err(format!("steps {steps:?}: each must be 1 to 100 percent"));
        }
        if steps.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!("steps {steps:?}: they must increase"));
        }
        if steps.last() != Some(&100) {
            return Err(format!("steps {steps:?}: the last must be 100"));
        }
        if !(0.0..=1.0).contains(&max_error_rate) || !max_p99_ms.is_finite() || max_p99_ms < 0.0 {
            return Err(format!(
                "max error rate {max_error_rate} must be within 0..1 and max p99 {max_p99_ms} \
                 at least 0"
            ));
        }
        Ok(Self {
            steps,
            interval_ms: if interval_ms == 0 {
                DEFAULT_INTERVAL_MS
            } else {
                interval_ms
            },
            max_error_rate: if max_error_rate == 0.0 {
                DEFAULT_MAX_ERROR_RATE
            } else {
                max_error_rate
            },
            max_p99_ms,
            min_requests: if min_requests == 0 {
                DEFAULT_MIN_REQUESTS
            } else {
                min_requests
            },
        })
    }

    /// How long a step may take to go live before the rollout gives up, ms.
    fn live_timeout_ms(&self) -> u64 {
        (2 * self.interval_ms).max(30_000)
    }

    /// How long a live step may wait for `min_requests` before the rollout gives up, ms.
    pub fn traffic_deadline_ms(&self) -> u64 {
        (10 * self.interval_ms).max(600_000)
    }
}

/// What to do with a step.
#[derive(Clone, Debug, PartialEq)]
pub enum Verdict {
    /// Keep it (why).
    Wait(String),
    /// Move on (why).
    Promote(String),
    /// Give the share the old version back (why).
    Rollback(String),
}

fn pct(rate: f64) -> String {
    format!("{:.2}%", rate * 100.0)
}

/// Judges a step live for `live_ms`: the canary's traffic over that time against the
/// baseline's over the same time. Judged once the step's interval is over; until then it
/// waits, and it waits on while the canary has answered fewer than `min_requests`.
pub fn decide(gates: &Gates, live_ms: u64, canary: &Sample, baseline: &Sample) -> Verdict {
    if live_ms < gates.interval_ms {
        return Verdict::Wait(format!(
            "{}s left in the step; the new version answered {} requests, {} failed",
            (gates.interval_ms - live_ms).div_ceil(1000),
            canary.requests,
            canary.failures
        ));
    }
    if canary.requests < gates.min_requests {
        if live_ms >= gates.traffic_deadline_ms() {
            return Verdict::Rollback(format!(
                "not enough traffic to judge it: the new version answered {} requests in {} s \
                 (a step needs {})",
                canary.requests,
                live_ms / 1000,
                gates.min_requests
            ));
        }
        return Verdict::Wait(format!(
            "waiting for traffic: the new version answered {} of the {} requests a step needs",
            canary.requests, gates.min_requests
        ));
    }
    // The old version's error rate, when it answered enough to have one, is what the new one
    // is held to (a failing backend fails both); else the new one's own is.
    let compared = baseline.requests >= gates.min_requests;
    let base = if compared { baseline.error_rate() } else { 0.0 };
    let excess = canary.error_rate() - base;
    if excess > gates.max_error_rate {
        let against = if compared {
            format!("the old version's {} over the same time", pct(base))
        } else {
            "no old version to compare with".to_owned()
        };
        return Verdict::Rollback(format!(
            "error rate {} ({} of {} requests failed) against {against}: more than {} over",
            pct(canary.error_rate()),
            canary.failures,
            canary.requests,
            pct(gates.max_error_rate)
        ));
    }
    if gates.max_p99_ms > 0.0 && canary.p99_ms > gates.max_p99_ms {
        return Verdict::Rollback(format!(
            "p99 latency {:.1} ms over the limit of {:.1} ms (the old version's: {:.1} ms)",
            canary.p99_ms, gates.max_p99_ms, baseline.p99_ms
        ));
    }
    Verdict::Promote(format!(
        "error rate {} (old {}), p99 {:.1} ms (old {:.1} ms) over {} requests",
        pct(canary.error_rate()),
        pct(baseline.error_rate()),
        canary.p99_ms,
        baseline.p99_ms,
        canary.requests
    ))
}

/// Where a rollout is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Moving through its steps.
    Progressing,
    /// Applied to every proxy.
    Succeeded,
    /// Given up by itself: a gate failed, a proxy NACKed, a step did not go live.
    RolledBack,
    /// Stopped by an operator.
    Aborted,
}

impl State {
    /// As the API spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Progressing => "progressing",
            State::Succeeded => "succeeded",
            State::RolledBack => "rolled_back",
            State::Aborted => "aborted",
        }
    }
}

/// One decision, as recorded.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// When, ms since the epoch.
    pub at_ms: u64,
    /// The step, in percent.
    pub step_percent: u32,
    /// `start`, `promote`, `succeed`, `rollback` or `abort`.
    pub action: &'static str,
    /// Why.
    pub reason: String,
    /// The new version's traffic over the step, when judged.
    pub canary: Option<Sample>,
    /// The old version's.
    pub baseline: Option<Sample>,
}

/// A rollout as the API shows it.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// `r<n>-<start ms>`.
    pub id: String,
    /// Where it is.
    pub state: State,
    /// `kind/name` of what it moves.
    pub resources: Vec<String>,
    /// A module rollout: `name` and the digest it moves to.
    pub module: Option<(String, String)>,
    /// Its gates.
    pub gates: Gates,
    /// The index of the step now.
    pub step: usize,
    /// The proxies it changes.
    pub proxies: usize,
    /// The ids of those in the share now.
    pub share: Vec<String>,
    /// When it started, ms since the epoch.
    pub started_ms: u64,
    /// When it last changed.
    pub updated_ms: u64,
    /// When the step went live (0: not yet).
    pub step_live_ms: u64,
    /// Why it is where it is.
    pub reason: String,
    /// Its decisions, oldest first.
    pub decisions: Vec<Decision>,
    /// The config version its promotion made.
    pub version: u64,
}

struct Active {
    record: Record,
    overlay: Overlay,
    /// The proxies the overlay changes, in step order.
    selected: Vec<String>,
    share: BTreeSet<String>,
    step_started_ms: u64,
    /// The old version's traffic over the last judged step: what the last step (with no
    /// proxy left on the old version) is held to.
    last_baseline: Option<Sample>,
    /// The last step's promotion is being applied: an abort now would be overtaken by it.
    promoting: bool,
}

#[derive(Default)]
struct Inner {
    active: Option<Active>,
    history: VecDeque<Record>,
    started: u64,
    generation: u64,
}

/// The rollout running, if any, and those that ran.
#[derive(Default)]
pub struct Rollouts {
    inner: Mutex<Inner>,
}

impl Rollouts {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The overlay proxy `id` runs with: the running rollout's, when it is in its share.
    pub fn overlay_for(&self, id: &str) -> Option<Overlay> {
        let inner = self.lock();
        let active = inner.active.as_ref()?;
        active.share.contains(id).then(|| active.overlay.clone())
    }

    /// Whether the running rollout moves resource `kind`/`name` (applies of it are
    /// refused meanwhile).
    pub fn moving(&self, kind: Kind, name: &str) -> bool {
        let inner = self.lock();
        inner
            .active
            .as_ref()
            .is_some_and(|a| a.overlay.1.contains_key(&(kind, name.to_owned())))
    }

    /// The running rollout, else the last one.
    pub fn current(&self) -> Option<Record> {
        let inner = self.lock();
        match &inner.active {
            Some(a) => Some(a.record.clone()),
            None => inner.history.front().cloned(),
        }
    }

    /// Every rollout, newest first.
    pub fn list(&self) -> Vec<Record> {
        let inner = self.lock();
        inner
            .active
            .iter()
            .map(|a| a.record.clone())
            .chain(inner.history.iter().cloned())
            .collect()
    }
}

/// The order proxies join a rollout's share in.
fn order(rollout: &str, ids: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut keyed: Vec<([u8; 32], String)> = ids
        .into_iter()
        .map(|id| {
            let h = Sha256::digest(format!("{rollout}/{id}").as_bytes());
            (h.into(), id)
        })
        .collect();
    keyed.sort();
    keyed.into_iter().map(|(_, id)| id).collect()
}

/// The share of `n` proxies a step of `percent` takes: at least one.
pub fn share_size(percent: u32, n: usize) -> usize {
    ((percent as usize * n).div_ceil(100)).clamp(1.min(n), n)
}

/// The connected proxies whose snapshot `overlay` changes.
fn changed_by(state: &ControlState, overlay: &Overlay) -> Vec<String> {
    state
        .proxies()
        .into_iter()
        .filter(|p| p.connected)
        .filter(|p| {
            state.snapshot(&p.labels).hash != state.snapshot_with(&p.labels, Some(overlay)).hash
        })
        .map(|p| p.id)
        .collect()
}

/// What to roll out.
pub enum Target {
    /// These resources' new version.
    Resources(Vec<Resource>),
    /// The chains running an older build of this module name.
    Module(String),
}

/// Starts a rollout (or, with `now`, applies the new version at once and records that).
pub fn start(
    state: &ControlState,
    target: Target,
    gates: Gates,
    now: bool,
) -> Result<Record, ControlError> {
    if let Some(a) = &state.rollouts.lock().active {
        return Err(ControlError::Conflict(format!(
            "rollout {} is in progress; wait for it or abort it (`weftctl rollout abort`)",
            a.record.id
        )));
    }
    let (resources, module) = match target {
        Target::Resources(r) => (r, None),
        Target::Module(name) => {
            let (digest, chains) = state.module_candidates(&name)?;
            (chains, Some((name, digest)))
        }
    };
    if resources.is_empty() {
        return Err(ControlError::Invalid("nothing to roll out".into()));
    }
    if let Some(r) = resources
        .iter()
        .find(|r| !matches!(r.kind, Kind::Chain | Kind::FilterConfig))
    {
        return Err(ControlError::Invalid(format!(
            "{} `{}`: only chains and filter configs roll out in steps; apply it",
            r.kind.as_str().to_lowercase(),
            r.name
        )));
    }
    let (checked, changes) = state.checked(resources)?;
    if changes.iter().all(|c| c.action == "unchanged") {
        return Err(ControlError::Invalid(
            "nothing to roll out: every resource is unchanged".into(),
        ));
    }
    let at = now_ms();
    let names: Vec<String> = checked
        .iter()
        .map(|r| format!("{}/{}", r.kind.as_str().to_lowercase(), r.name))
        .collect();
    let mut inner = state.rollouts.lock();
    inner.started += 1;
    inner.generation += 1;
    let id = format!("r{}-{at}", inner.started);
    let mut record = Record {
        id: id.clone(),
        state: State::Progressing,
        resources: names,
        module,
        gates,
        step: 0,
        proxies: 0,
        share: Vec::new(),
        started_ms: at,
        updated_ms: at,
        step_live_ms: 0,
        reason: String::new(),
        decisions: Vec::new(),
        version: 0,
    };
    let overlay: Overlay = (
        inner.generation,
        Arc::new(
            checked
                .iter()
                .map(|r| ((r.kind, r.name.clone()), r.clone()))
                .collect::<BTreeMap<_, _>>(),
        ),
    );
    drop(inner);
    if now {
        let (version, _) = state.apply(checked, false)?;
        record.state = State::Succeeded;
        record.step = record.gates.steps.len() - 1;
        record.version = version;
        record.reason = format!("applied at once (--now) as config version {version}");
        record.decisions.push(Decision {
            at_ms: at,
            step_percent: 100,
            action: "succeed",
            reason: record.reason.clone(),
            canary: None,
            baseline: None,
        });
        finish(&mut state.rollouts.lock(), record.clone());
        return Ok(record);
    }
    let selected = order(&id, changed_by(state, &overlay));
    if selected.is_empty() {
        return Err(ControlError::Invalid(
            "no connected proxy runs what these resources change; apply them instead".into(),
        ));
    }
    let k = share_size(record.gates.steps[0], selected.len());
    let share: BTreeSet<String> = selected[..k].iter().cloned().collect();
    record.proxies = selected.len();
    record.share = share.iter().cloned().collect();
    record.reason = format!(
        "step {}%: waiting for {k} of {} proxies to run the new version",
        record.gates.steps[0],
        selected.len()
    );
    record.decisions.push(Decision {
        at_ms: at,
        step_percent: record.gates.steps[0],
        action: "start",
        reason: format!("{} proxies run what it changes", selected.len()),
        canary: None,
        baseline: None,
    });
    {
        let mut inner = state.rollouts.lock();
        if inner.active.is_some() {
            return Err(ControlError::Conflict(
                "another rollout started meanwhile".into(),
            ));
        }
        inner.active = Some(Active {
            record: record.clone(),
            overlay,
            selected,
            share,
            step_started_ms: at,
            last_baseline: None,
            promoting: false,
        });
    }
    tracing::info!(rollout = %id, proxies = record.proxies, "rollout started");
    state.reconsider();
    Ok(record)
}

/// Ends a finished rollout into the history.
fn finish(inner: &mut Inner, record: Record) {
    inner.history.push_front(record);
    inner.history.truncate(HISTORY);
}

/// Stops the running rollout: the share gets the old version back.
pub fn abort(state: &ControlState, reason: &str) -> Result<Record, ControlError> {
    let record = {
        let mut inner = state.rollouts.lock();
        if inner.active.as_ref().is_some_and(|a| a.promoting) {
            return Err(ControlError::Conflict(
                "the rollout is being promoted to every proxy; too late to abort".into(),
            ));
        }
        let Some(mut active) = inner.active.take() else {
            return Err(ControlError::NotFound("a rollout in progress".into()));
        };
        let at = now_ms();
        let reason = match reason {
            "" => "aborted by an operator".to_owned(),
            r => format!("aborted: {r}"),
        };
        let r = &mut active.record;
        r.state = State::Aborted;
        r.updated_ms = at;
        r.reason = reason.clone();
        r.decisions.push(Decision {
            at_ms: at,
            step_percent: r.gates.steps[r.step],
            action: "abort",
            reason,
            canary: None,
            baseline: None,
        });
        r.share.clear();
        finish(&mut inner, active.record.clone());
        active.record
    };
    tracing::warn!(rollout = %record.id, "rollout aborted");
    state.reconsider();
    Ok(record)
}

/// Moves the running rollout on every quarter second until the service stops.
pub async fn drive(state: Arc<ControlState>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
    loop {
        tick.tick().await;
        let s = state.clone();
        // Snapshots are made and config may be applied: off the async threads.
        if let Err(e) = tokio::task::spawn_blocking(move || step(&s, now_ms())).await {
            tracing::error!("rollout step failed: {e}");
        }
    }
}

/// What one look at the running rollout found.
enum Outcome {
    Live,
    Judged(Verdict, Sample, Sample),
    Failed(String),
    Nothing,
}

/// Looks at the running rollout once, at `now`: its step goes live, is judged, moves on,
/// or rolls back.
pub fn step(state: &ControlState, now: u64) {
    let (id, overlay, share, selected, step_live, step_started, gates, last_baseline) = {
        let inner = state.rollouts.lock();
        let Some(a) = &inner.active else { return };
        (
            a.record.id.clone(),
            a.overlay.clone(),
            a.share.clone(),
            a.selected.clone(),
            a.record.step_live_ms,
            a.step_started_ms,
            a.record.gates.clone(),
            a.last_baseline.clone(),
        )
    };
    // Where the share stands, live or not: a proxy of it may NACK at any time (a restart,
    // a reconnect, another change making its snapshot again).
    let proxies = state.proxies();
    let (mut pending, mut running, mut refused) = (0, 0, None);
    for p in proxies
        .iter()
        .filter(|p| share.contains(&p.id) && p.connected)
    {
        let want = state.snapshot_with(&p.labels, Some(&overlay)).hash.clone();
        if p.acked_hash == want {
            running += 1;
        } else if p.nacked_hash == want && !p.nack_error.is_empty() {
            refused = Some(format!(
                "proxy {} refused the new version: {}",
                p.id, p.nack_error
            ));
            break;
        } else {
            pending += 1;
        }
    }
    let outcome = if let Some(why) = refused {
        Outcome::Failed(why)
    } else if step_live == 0 {
        // Live once every connected proxy of the share runs the overlay, and one at least.
        if pending == 0 && running > 0 {
            Outcome::Live
        } else if now.saturating_sub(step_started) > gates.live_timeout_ms() {
            Outcome::Failed(if running + pending == 0 {
                format!(
                    "no proxy of the step was connected for {} s",
                    gates.live_timeout_ms() / 1000
                )
            } else {
                format!(
                    "{pending} proxies did not run the new version within {} s",
                    gates.live_timeout_ms() / 1000
                )
            })
        } else {
            Outcome::Nothing
        }
    } else {
        let others: BTreeSet<String> = selected
            .iter()
            .filter(|id| !share.contains(*id))
            .cloned()
            .collect();
        let canary = state.stats.sample(&share, step_live);
        // The last step leaves no proxy on the old version: it is held to the old
        // version's traffic over the step before.
        let baseline = if others.is_empty() {
            last_baseline.unwrap_or_default()
        } else {
            state.stats.sample(&others, step_live)
        };
        let verdict = decide(&gates, now.saturating_sub(step_live), &canary, &baseline);
        Outcome::Judged(verdict, canary, baseline)
    };
    // The last step promoted: the new version becomes the stored config, while the whole
    // share still runs it as the overlay (so no proxy sees a change).
    let mut applied = None;
    if let Outcome::Judged(Verdict::Promote(_), ..) = &outcome {
        let last = {
            let mut inner = state.rollouts.lock();
            match inner.active.as_mut() {
                Some(a) if a.record.id == id && a.record.step + 1 == gates.steps.len() => {
                    // From here an abort is refused: the apply below would overtake it.
                    a.promoting = true;
                    true
                }
                _ => false,
            }
        };
        if last {
            let resources: Vec<Resource> = overlay.1.values().cloned().collect();
            applied = Some(state.apply(resources, false).map(|(v, _)| v));
        }
    }
    let mut reconsider = false;
    {
        let mut inner = state.rollouts.lock();
        let Some(a) = inner.active.as_mut().filter(|a| a.record.id == id) else {
            return;
        };
        let r = &mut a.record;
        let percent = gates.steps[r.step];
        let decision = |action, reason: String, canary, baseline| Decision {
            at_ms: now,
            step_percent: percent,
            action,
            reason,
            canary,
            baseline,
        };
        let mut ended = None;
        match outcome {
            Outcome::Nothing => return,
            Outcome::Live => {
                r.step_live_ms = now;
                r.updated_ms = now;
                r.reason = format!(
                    "step {percent}%: {} of {} proxies run the new version",
                    a.share.len(),
                    a.selected.len()
                );
            }
            Outcome::Failed(why) => ended = Some((why, None, None)),
            Outcome::Judged(Verdict::Wait(why), ..) => {
                r.reason = format!("step {percent}%: {why}");
            }
            Outcome::Judged(Verdict::Rollback(why), canary, baseline) => {
                ended = Some((why, Some(canary), Some(baseline)));
            }
            Outcome::Judged(Verdict::Promote(why), canary, baseline) => match applied {
                Some(Err(e)) => {
                    a.promoting = false;
                    ended = Some((format!("the promotion failed: {e}"), None, None))
                }
                Some(Ok(version)) => {
                    r.state = State::Succeeded;
                    r.version = version;
                    r.updated_ms = now;
                    r.reason = format!("every proxy runs it: config version {version}");
                    r.decisions
                        .push(decision("succeed", why, Some(canary), Some(baseline)));
                    r.share = a.selected.clone();
                    let done = inner.active.take().map(|a| a.record);
                    if let Some(done) = done {
                        tracing::info!(rollout = %done.id, version, "rollout succeeded");
                        finish(&mut inner, done);
                    }
                    reconsider = true;
                }
                None => {
                    // The next step: its share joins from the same order.
                    r.decisions.push(decision(
                        "promote",
                        why,
                        Some(canary),
                        Some(baseline.clone()),
                    ));
                    a.last_baseline = Some(baseline);
                    r.step += 1;
                    let next = gates.steps[r.step];
                    let k = share_size(next, a.selected.len());
                    a.share = a.selected[..k].iter().cloned().collect();
                    r.share = a.share.iter().cloned().collect();
                    r.step_live_ms = 0;
                    r.updated_ms = now;
                    r.reason = format!("step {next}%: waiting for {k} proxies");
                    a.step_started_ms = now;
                    tracing::info!(rollout = %r.id, step = next, "rollout promoted");
                    reconsider = true;
                }
            },
        }
        if let Some((why, canary, baseline)) = ended {
            let Some(mut done) = inner.active.take().map(|a| a.record) else {
                return;
            };
            done.state = State::RolledBack;
            done.updated_ms = now;
            done.reason = why.clone();
            done.share.clear();
            done.decisions
                .push(decision("rollback", why, canary, baseline));
            tracing::warn!(rollout = %done.id, reason = %done.reason, "rollout rolled back");
            finish(&mut inner, done);
            reconsider = true;
        }
    }
    if reconsider {
        state.reconsider();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gates() -> Gates {
        Gates::new(vec![10, 50, 100], 30_000, 0.01, 50.0, 20).unwrap()
    }

    fn sample(requests: u64, failures: u64, p99_ms: f64) -> Sample {
        Sample {
            requests,
            failures,
            p99_ms,
        }
    }

    #[test]
    fn gates_default_and_refuse_steps_that_do_not_end_at_100() {
        let g = Gates::new(vec![], 0, 0.0, 0.0, 0).unwrap();
        assert_eq!(g.steps, DEFAULT_STEPS);
        assert_eq!(
            (g.interval_ms, g.max_error_rate, g.min_requests),
            (30_000, 0.01, 20)
        );
        for bad in [
            vec![10, 50],
            vec![50, 10, 100],
            vec![0, 100],
            vec![10, 10, 100],
        ] {
            assert!(Gates::new(bad.clone(), 0, 0.0, 0.0, 0).is_err(), "{bad:?}");
        }
        assert!(Gates::new(vec![100], 0, 1.5, 0.0, 0).is_err());
    }

    #[test]
    fn a_step_waits_out_its_interval_then_for_traffic() {
        let g = gates();
        let bad = sample(1000, 500, 10.0);
        assert!(matches!(
            decide(&g, 29_999, &bad, &sample(0, 0, 0.0)),
            Verdict::Wait(_)
        ));
        let quiet = decide(&g, 30_000, &sample(19, 0, 1.0), &sample(500, 0, 1.0));
        assert!(
            matches!(&quiet, Verdict::Wait(w) if w.contains("19 of the 20")),
            "{quiet:?}"
        );
        // Not forever: past the traffic deadline a quiet step is rolled back.
        let late = decide(
            &g,
            g.traffic_deadline_ms(),
            &sample(3, 0, 1.0),
            &sample(0, 0, 0.0),
        );
        assert!(
            matches!(&late, Verdict::Rollback(w) if w.contains("not enough traffic")),
            "{late:?}"
        );
    }

    #[test]
    fn a_failing_new_version_rolls_back_and_a_healthy_one_is_promoted() {
        let g = gates();
        // 20% of the new version's requests fail, none of the old one's.
        let v = decide(&g, 30_000, &sample(100, 20, 5.0), &sample(900, 0, 5.0));
        assert!(
            matches!(&v, Verdict::Rollback(w) if w.contains("20.00%")),
            "{v:?}"
        );
        // As good as the old one.
        let v = decide(&g, 30_000, &sample(100, 0, 5.0), &sample(900, 0, 5.0));
        assert!(matches!(v, Verdict::Promote(_)), "{v:?}");
        // Too slow.
        let v = decide(&g, 30_000, &sample(100, 0, 80.0), &sample(900, 0, 5.0));
        assert!(
            matches!(&v, Verdict::Rollback(w) if w.contains("p99")),
            "{v:?}"
        );
    }

    #[test]
    fn a_backend_failing_both_versions_alike_is_not_blamed_on_the_new_one() {
        let g = gates();
        // Both versions see 10% failures: the new one adds nothing.
        let v = decide(&g, 40_000, &sample(200, 20, 5.0), &sample(1800, 180, 5.0));
        assert!(matches!(v, Verdict::Promote(_)), "{v:?}");
        // It adds 5 points: rolled back.
        let v = decide(&g, 40_000, &sample(200, 30, 5.0), &sample(1800, 180, 5.0));
        assert!(matches!(v, Verdict::Rollback(_)), "{v:?}");
        // With no old version to compare with (the last step), its own rate counts.
        let v = decide(&g, 40_000, &sample(200, 20, 5.0), &sample(0, 0, 0.0));
        assert!(matches!(v, Verdict::Rollback(_)), "{v:?}");
    }

    #[test]
    fn a_step_takes_at_least_one_proxy_and_the_order_is_stable() {
        assert_eq!(share_size(10, 4), 1);
        assert_eq!(share_size(50, 4), 2);
        assert_eq!(share_size(100, 4), 4);
        assert_eq!(share_size(1, 1000), 10);
        assert_eq!(share_size(10, 0), 0);
        let ids = || (0..20).map(|i| format!("p{i}"));
        assert_eq!(order("r1", ids()), order("r1", ids().rev()));
        assert_ne!(
            order("r1", ids()),
            order("r2", ids()),
            "each rollout its own order"
        );
    }
}
