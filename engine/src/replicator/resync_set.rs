//! The regions a copy may lack whole, and the progress of the resync pass
//! that sends them, kept together so that progress cannot drift from the set.
//!
//! A link inserts a region when the copy may lack it (dirty when the
//! connection began, or a change the copy did not get) and takes regions out
//! as a pass queues them. `resync_bytes_total` is what the running pass set
//! out to send plus every region added while it runs, and `resync_bytes_done`
//! what it has queued, so done never exceeds total. (It once did: a region
//! added during a pass — an async copy gone behind, a failed local write —
//! was sent by the pass but never counted in its total, and status showed
//! more done than total.)

/// A set of region indices as a bit vector: one bit per region of the volume.
#[derive(Debug)]
pub(crate) struct RegionSet {
    words: Vec<u64>,
    count: u64,
}

impl RegionSet {
    pub(crate) fn new(regions: u64) -> RegionSet {
        RegionSet { words: vec![0; regions.div_ceil(64) as usize], count: 0 }
    }

    /// Add `region`; whether it was not in the set before.
    pub(crate) fn insert(&mut self, region: u64) -> bool {
        let (word, bit) = ((region / 64) as usize, region % 64);
        if self.words[word] & (1 << bit) != 0 {
            return false;
        }
        self.words[word] |= 1 << bit;
        self.count += 1;
        true
    }

    /// Take `region` out; whether it was in the set.
    pub(crate) fn remove(&mut self, region: u64) -> bool {
        let (word, bit) = ((region / 64) as usize, region % 64);
        if self.words[word] & (1 << bit) == 0 {
            return false;
        }
        self.words[word] &= !(1 << bit);
        self.count -= 1;
        true
    }

    pub(crate) fn contains(&self, region: u64) -> bool {
        self.words.get((region / 64) as usize).is_some_and(|word| word & (1 << (region % 64)) != 0)
    }

    pub(crate) fn clear_all(&mut self) {
        self.words.fill(0);
        self.count = 0;
    }

    pub(crate) fn len(&self) -> u64 {
        self.count
    }

    /// The smallest region in the set that is `start` or after it.
    pub(crate) fn next_at_or_after(&self, start: u64) -> Option<u64> {
        let mut index = (start / 64) as usize;
        let mut word = *self.words.get(index)? & (u64::MAX << (start % 64));
        loop {
            if word != 0 {
                return Some(index as u64 * 64 + u64::from(word.trailing_zeros()));
            }
            index += 1;
            word = *self.words.get(index)?;
        }
    }
}

/// The regions to resync and the running pass's byte counts.
#[derive(Debug)]
pub(crate) struct ResyncSet {
    regions: RegionSet,
    region_bytes: u64,
    volume_bytes: u64,
    /// A pass is running: regions added now count in its total.
    running: bool,
    bytes_total: u64,
    bytes_done: u64,
}

impl ResyncSet {
    /// An empty set for a volume of `volume_bytes` in regions of `region_bytes`.
    pub(crate) fn new(volume_bytes: u64, region_bytes: u64) -> ResyncSet {
        assert!(region_bytes > 0, "regions have a size");
        ResyncSet {
            regions: RegionSet::new(volume_bytes.div_ceil(region_bytes)),
            region_bytes,
            volume_bytes,
            running: false,
            bytes_total: 0,
            bytes_done: 0,
        }
    }

    /// The bytes of `region` (the last one may be short).
    fn region_length(&self, region: u64) -> u64 {
        let start = region * self.region_bytes;
        (start + self.region_bytes).min(self.volume_bytes).saturating_sub(start)
    }

    /// Bytes of the regions in the set.
    pub(crate) fn bytes(&self) -> u64 {
        let full = self.regions.len() * self.region_bytes;
        let last = self.volume_bytes.div_ceil(self.region_bytes) - 1;
        if self.regions.contains(last) {
            full - (self.region_bytes - self.region_length(last))
        } else {
            full
        }
    }

    /// The copy may lack `region` whole; a running pass now has it to send too.
    pub(crate) fn insert(&mut self, region: u64) {
        if self.regions.insert(region) && self.running {
            self.bytes_total += self.region_length(region);
        }
    }

    /// `region` needs no resync after all (`--assume-clean`).
    pub(crate) fn remove(&mut self, region: u64) {
        if self.regions.remove(region) && self.running {
            self.bytes_total -= self.region_length(region);
        }
    }

    /// A pass queued `regions` whole: they leave the set and count as done.
    pub(crate) fn take(&mut self, regions: std::ops::Range<u64>) {
        for region in regions {
            if self.regions.remove(region) {
                self.bytes_done += self.region_length(region);
            }
        }
        assert!(
            self.bytes_done <= self.bytes_total,
            "resync progress: {} bytes done of {} (a region was taken that the pass never counted)",
            self.bytes_done,
            self.bytes_total
        );
    }

    /// A new pass starts: it sets out to send the whole set.
    pub(crate) fn start_pass(&mut self) {
        self.running = true;
        self.bytes_total = self.bytes();
        self.bytes_done = 0;
    }

    /// The pass ended (done, or its connection went away); the counts stay
    /// as the last pass left them.
    pub(crate) fn end_pass(&mut self) {
        self.running = false;
    }

    /// Forget every region (a connection begins and refills the set).
    pub(crate) fn clear_all(&mut self) {
        self.regions.clear_all();
    }

    pub(crate) fn contains(&self, region: u64) -> bool {
        self.regions.contains(region)
    }

    pub(crate) fn len(&self) -> u64 {
        self.regions.len()
    }

    pub(crate) fn next_at_or_after(&self, start: u64) -> Option<u64> {
        self.regions.next_at_or_after(start)
    }

    /// Bytes the current or last pass set out to send.
    pub(crate) fn bytes_total(&self) -> u64 {
        self.bytes_total
    }

    /// Bytes of it queued so far.
    pub(crate) fn bytes_done(&self) -> u64 {
        self.bytes_done
    }
}

#[cfg(test)]
mod tests {
    use super::{RegionSet, ResyncSet};

    #[test]
    fn region_set_finds_the_next_member() {
        let mut set = RegionSet::new(200);
        for region in [3, 64, 130, 199] {
            set.insert(region);
        }
        assert!(!set.insert(64));
        assert_eq!(set.len(), 4);
        assert_eq!(set.next_at_or_after(0), Some(3));
        assert_eq!(set.next_at_or_after(4), Some(64));
        assert_eq!(set.next_at_or_after(65), Some(130));
        assert_eq!(set.next_at_or_after(131), Some(199));
        assert_eq!(set.next_at_or_after(200), None);
        set.remove(130);
        assert!(!set.contains(130) && set.contains(199));
        assert_eq!(set.next_at_or_after(65), Some(199));
        set.clear_all();
        assert_eq!((set.len(), set.next_at_or_after(0)), (0, None));
    }

    /// Regions added while a pass runs, ahead of it or behind it (the pass
    /// goes round again), count in its total: done never passes total, and
    /// equals it when the set is empty. The last, short region counts its
    /// real length.
    #[test]
    fn progress_counts_regions_added_during_a_pass() {
        // 10 regions of 100 bytes, the last one 50 bytes long.
        let mut set = ResyncSet::new(950, 100);
        for region in [0, 1, 2, 9] {
            set.insert(region);
        }
        set.start_pass();
        assert_eq!(set.bytes_total(), 350);
        set.take(0..2);
        set.insert(5); // ahead of the pass (an async copy went behind)
        set.insert(0); // behind it: the pass goes round again (a failed local write)
        set.insert(2); // already pending: counted once
        assert_eq!(set.bytes_total(), 550);
        set.take(2..3);
        set.take(5..6);
        set.take(9..10);
        set.take(0..1);
        assert_eq!((set.len(), set.bytes_done(), set.bytes_total()), (0, 550, 550));
        set.end_pass();
        set.insert(3); // no pass runs: the next pass counts it
        assert_eq!(set.bytes_total(), 550);
        set.start_pass();
        assert_eq!((set.bytes_done(), set.bytes_total()), (0, 100));
    }
}
