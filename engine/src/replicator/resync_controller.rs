//! How much resync a copy's link carries at once: the adaptive resync
//! controller (issue 13, item 5), in the spirit of DRBD's `c-plan-ahead` /
//! `c-fill-target` and of delay-based congestion control (LEDBAT, TCP
//! Vegas). A pure state machine the link core feeds with the round trip of
//! every acknowledged data frame and asks for its window; time is passed in.
//!
//! Why: resync data and application writes share one ordered stream, so a
//! write queued behind resync data waits for all of it to cross the link.
//! The fixed window this replaces (32 MiB in flight) kept a 100 Mbit link
//! full, but put 2.7 s of resync ahead of every write: a sync copy's
//! application got 5 % of its write throughput during a resync over
//! 100 Mbit/40 ms (tests/tests/wan.rs). Resync needs only what keeps the
//! link busy — its bandwidth-delay product and a little queue — and the
//! queue it builds is the delay every write pays.
//!
//! How: each acknowledged write or resync data frame gives a delay sample:
//! its round trip (sent to acknowledged) less the time its own bytes take
//! on the link at the measured delivery rate, so a large frame is not
//! taken for a queue. The least sample over the last 30–60 s is the path's
//! own delay (`base`); the least of each round (about one base delay) less
//! `base` is the queue the link holds. The window (resync and write bytes
//! in flight together: writes first, resync fills what they leave) grows
//! each round it held the resync back and no queue was seen — doubling
//! until the first queue, then by a sixteenth — and shrinks by a quarter
//! each round the queue is over `max(2 ms, base / 16)`, but never below
//! the bandwidth-delay product (delivery rate × base) and a frame: that
//! much in flight keeps the link busy without a queue. The delivery rate is
//! the best of the last 10 s of spans of at least 500 ms (shorter spans
//! overstate it: acknowledgements come in bursts).
//!
//! Two more rules keep writes from queueing behind resync (link_core): the
//! most write bytes in flight this round or the last stay reserved for
//! writes (a write acknowledged leaves room its successor takes a moment
//! later; resync taking it at once would queue ahead of that write, round
//! after round, the two paced by the same acknowledgements), and a resync
//! read is at most an eighth of the window (a large region goes in parts),
//! since a read is what a write queued right behind it waits for.
//!
//! Measured over the WAN rig (100 Mbit/40 ms, tests/tests/wan.rs): a sync
//! copy's application, writing 64 KiB blocks four at a time, kept 78–80 %
//! of its write throughput during a full resync with the link 85–86 %
//! busy (TCP payload; 95.6 % is the most), where the fixed window left it
//! 5 %. `--resync-rate-max` still caps the rate (link_core), and the window
//! never exceeds the fixed bound it replaces.

use std::collections::VecDeque;

/// The window a connection's first pass starts from, before anything is
/// measured (small, so the first round trips measure the path's own delay,
/// not a queue the resync built).
const INITIAL_WINDOW_BYTES: u64 = 512 << 10;
/// The window never goes below this (the core lets one resync read out
/// even at the minimum, so a resync always progresses).
pub(crate) const WINDOW_MIN_BYTES: u64 = 64 << 10;
/// A control round lasts at least this long (and at least a base delay).
const ROUND_MIN_MS: u64 = 10;
/// A delivery rate sample spans at least this long (acknowledgements come
/// in bursts; shorter spans overstate the rate).
const RATE_INTERVAL_MIN_MS: u64 = 500;
/// The delivery rate is the best sample of the last this long.
const RATE_WINDOW_MS: u64 = 10_000;
/// The base delay is the least sample of the current and the previous
/// period of this long.
const BASE_PERIOD_MS: u64 = 30_000;
/// The queue allowed: at least this many microseconds…
const QUEUE_DELAY_MIN_US: u64 = 2_000;
/// …and at least the base delay divided by this.
const QUEUE_DELAY_BASE_DIVISOR: u64 = 16;

/// The controller of one copy's link (see the module docs).
#[derive(Debug, Clone)]
pub(crate) struct ResyncController {
    window_bytes: u64,
    window_max_bytes: u64,
    /// Doubling each round until the first queue is seen.
    slow_start: bool,
    /// The current control round.
    round: Round,
    /// The current delivery rate interval: (start, bytes acknowledged).
    rate_interval: Option<(u64, u64)>,
    /// Delivery rate samples, bytes per second: (when taken, rate).
    rates: VecDeque<(u64, u64)>,
    /// Least delay samples, in microseconds, of the current period (begun
    /// at `base_period_start_ms`) and of the previous one.
    base_current_us: Option<u64>,
    base_previous_us: Option<u64>,
    base_period_start_ms: u64,
    /// The most write bytes in flight during the previous round.
    writes_peak_previous_bytes: u64,
}

#[derive(Debug, Clone, Default)]
struct Round {
    start_ms: Option<u64>,
    /// The least delay sample of the round, in microseconds.
    least_delay_us: Option<u64>,
    /// The window held the resync back during the round.
    limited: bool,
    /// The most write bytes in flight during the round.
    writes_peak_bytes: u64,
}

impl ResyncController {
    /// A controller whose window never exceeds `window_max_bytes`.
    pub(crate) fn new(window_max_bytes: u64) -> ResyncController {
        assert!(window_max_bytes > 0, "a resync window holds at least a byte");
        ResyncController {
            window_bytes: INITIAL_WINDOW_BYTES.min(window_max_bytes),
            window_max_bytes,
            slow_start: true,
            round: Round::default(),
            rate_interval: None,
            rates: VecDeque::new(),
            base_current_us: None,
            base_previous_us: None,
            base_period_start_ms: 0,
            writes_peak_previous_bytes: 0,
        }
    }

    /// Resync and write bytes allowed in flight now.
    pub(crate) fn window_bytes(&self) -> u64 {
        self.window_bytes
    }

    /// The delivery rate measured, bytes per second (`None` before the
    /// first sample).
    pub(crate) fn rate_bytes_per_second(&self) -> Option<u64> {
        self.rates.iter().map(|&(_, rate)| rate).max()
    }

    /// The path's own round trip measured, in microseconds.
    pub(crate) fn base_delay_us(&self) -> Option<u64> {
        match (self.base_current_us, self.base_previous_us) {
            (Some(current), Some(previous)) => Some(current.min(previous)),
            (current, previous) => current.or(previous),
        }
    }

    /// A new connection: its path may differ, so nothing measured is kept.
    pub(crate) fn connected(&mut self, now_ms: u64) {
        *self = ResyncController::new(self.window_max_bytes);
        self.base_period_start_ms = now_ms;
    }

    /// What the link holds: its delivery rate times its own round trip.
    fn bandwidth_delay_product(&self) -> Option<u64> {
        let (rate, base_us) = (self.rate_bytes_per_second()?, self.base_delay_us()?);
        u64::try_from(u128::from(rate) * u128::from(base_us) / 1_000_000).ok()
    }

    /// A resync pass begins: the window starts from what the link was
    /// measured to hold (its bandwidth-delay product), or from the
    /// initial window, and grows from there as at a connection's start.
    pub(crate) fn pass_started(&mut self) {
        self.window_bytes = self
            .bandwidth_delay_product()
            .unwrap_or(INITIAL_WINDOW_BYTES)
            .clamp(WINDOW_MIN_BYTES.min(self.window_max_bytes), self.window_max_bytes);
        self.slow_start = true;
        self.round = Round::default();
    }

    /// The window held back resync data that was ready to go.
    pub(crate) fn held_back(&mut self) {
        self.round.limited = true;
    }

    /// `bytes` of writes are in flight now (a write was queued).
    pub(crate) fn writes_in_flight(&mut self, bytes: u64) {
        self.round.writes_peak_bytes = self.round.writes_peak_bytes.max(bytes);
    }

    /// The share of the window kept for writes: the most they had in
    /// flight this round or the last. A write acknowledged leaves its room
    /// to the application's next write, which follows within a moment;
    /// resync taking that room at once would put itself ahead of that
    /// write, round after round (the two keep step, paced by the same
    /// acknowledgements).
    pub(crate) fn writes_reserve_bytes(&self) -> u64 {
        self.round.writes_peak_bytes.max(self.writes_peak_previous_bytes)
    }

    /// A data frame of `bytes` (a write or resync data) sent at
    /// `sent_at_ms` was acknowledged at `now_ms`.
    pub(crate) fn acked(&mut self, now_ms: u64, sent_at_ms: u64, bytes: u64) {
        self.measure_rate(now_ms, bytes);
        let own_us = self.rate_bytes_per_second().map_or(0, |rate| {
            u64::try_from(u128::from(bytes) * 1_000_000 / u128::from(rate.max(1))).unwrap_or(u64::MAX)
        });
        let delay_us = now_ms.saturating_sub(sent_at_ms).saturating_mul(1000).saturating_sub(own_us);
        if now_ms.saturating_sub(self.base_period_start_ms) >= BASE_PERIOD_MS {
            self.base_previous_us = self.base_current_us.take();
            self.base_period_start_ms = now_ms;
        }
        self.base_current_us = Some(self.base_current_us.map_or(delay_us, |least| least.min(delay_us)));
        self.round.least_delay_us = Some(self.round.least_delay_us.map_or(delay_us, |least| least.min(delay_us)));
        let start_ms = *self.round.start_ms.get_or_insert(now_ms);
        let base_ms = self.base_delay_us().unwrap_or(0) / 1000;
        if now_ms.saturating_sub(start_ms) >= base_ms.max(ROUND_MIN_MS) {
            self.end_round(now_ms);
        }
    }

    fn measure_rate(&mut self, now_ms: u64, bytes: u64) {
        // The first acknowledgement only starts the clock: its bytes
        // crossed the link before.
        let Some((start_ms, acknowledged)) = self.rate_interval.as_mut() else {
            self.rate_interval = Some((now_ms, 0));
            return;
        };
        *acknowledged += bytes;
        let (start_ms, acknowledged) = (*start_ms, *acknowledged);
        let base_ms = self.base_delay_us().unwrap_or(0) / 1000;
        let elapsed_ms = now_ms.saturating_sub(start_ms);
        if elapsed_ms >= base_ms.max(RATE_INTERVAL_MIN_MS) {
            let rate = u64::try_from(u128::from(acknowledged) * 1000 / u128::from(elapsed_ms)).unwrap_or(u64::MAX);
            self.rates.push_back((now_ms, rate));
            while self.rates.front().is_some_and(|&(at, _)| now_ms.saturating_sub(at) > RATE_WINDOW_MS) {
                self.rates.pop_front();
            }
            // The next interval begins with this acknowledgement.
            self.rate_interval = Some((now_ms, 0));
        }
    }

    /// The queue the round saw decides the window (see the module docs).
    fn end_round(&mut self, now_ms: u64) {
        let round = std::mem::take(&mut self.round);
        self.round.start_ms = Some(now_ms);
        self.writes_peak_previous_bytes = round.writes_peak_bytes;
        let (Some(least_us), Some(base_us)) = (round.least_delay_us, self.base_delay_us()) else { return };
        let queue_us = least_us.saturating_sub(base_us);
        let allowed_us = QUEUE_DELAY_MIN_US.max(base_us / QUEUE_DELAY_BASE_DIVISOR);
        if queue_us > allowed_us {
            // Never below what keeps the link busy without a queue: its
            // bandwidth-delay product, and a frame on the wire.
            self.slow_start = false;
            let busy = self.bandwidth_delay_product().map_or(0, |product| product.saturating_add(WINDOW_MIN_BYTES));
            self.window_bytes =
                (self.window_bytes - self.window_bytes / 4).max(busy).max(WINDOW_MIN_BYTES).min(self.window_max_bytes);
        } else if round.limited {
            let grown = if self.slow_start {
                self.window_bytes.saturating_mul(2)
            } else {
                self.window_bytes + (self.window_bytes / 16).max(WINDOW_MIN_BYTES)
            };
            self.window_bytes = grown.min(self.window_max_bytes);
        }
        tracing::debug!(
            window_bytes = self.window_bytes,
            queue_us,
            allowed_us,
            base_us,
            limited = round.limited,
            rate = self.rate_bytes_per_second().unwrap_or(0),
            "resync controller round"
        );
        assert!(
            (WINDOW_MIN_BYTES.min(self.window_max_bytes)..=self.window_max_bytes).contains(&self.window_bytes),
            "the resync window {} stays within its bounds",
            self.window_bytes
        );
    }
}
