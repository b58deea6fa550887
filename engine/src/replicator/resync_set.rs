//! The regions a copy may lack whole, and the progress of the resync pass
//! that sends them, kept together so that progress cannot drift from the set.
//!
//! A link inserts a region when the copy may lack it (dirty when the
//! connection began, or a change the copy did not get) and takes regions out
//! as a pass queues them. A region is pending whole, or, when every byte the
//! copy may lack is known, only in parts: a 64th of the region each (at least
//! 4 KiB), kept as a mask. A change a connected copy did not get (an async
//! copy gone behind, a failed local write) is such a case: the copy has
//! every other byte of the region, or has it queued on the same connection.
//! A 4 KiB write missed on a 1 TiB volume (256 KiB regions) then costs 4 KiB
//! of resync, not 256 KiB. The set is rebuilt whole from the bitmap when a
//! connection begins, so parts never outlive the connection they were
//! learned on. `resync_bytes_total` is what the running pass set
//! out to send plus every region added while it runs, and `resync_bytes_done`
//! what it has queued, so done never exceeds total. (It once did: a region
//! added during a pass — an async copy gone behind, a failed local write —
//! was sent by the pass but never counted in its total, and status showed
//! more done than total.)

use std::collections::HashMap;

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

/// The least a part of a region is: resync reads of a part stay aligned for a
/// volume opened with O_DIRECT.
const PART_BYTES_MIN: u64 = 4096;

/// The regions to resync and the running pass's byte counts.
#[derive(Debug)]
pub(crate) struct ResyncSet {
    regions: RegionSet,
    /// Regions pending only in parts: bit `i` of the mask is bytes
    /// `i * part_bytes..(i + 1) * part_bytes` of the region. A region in
    /// `regions` with no entry is pending whole.
    parts: HashMap<u64, u64>,
    part_bytes: u64,
    /// Bytes pending: whole regions' lengths plus the parts' lengths.
    pending_bytes: u64,
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
            parts: HashMap::new(),
            part_bytes: (region_bytes / 64).max(PART_BYTES_MIN).min(region_bytes),
            pending_bytes: 0,
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

    /// Bytes the regions in the set hold, whole regions and the parts of
    /// regions pending in parts alike.
    pub(crate) fn region_bytes(&self) -> u64 {
        let full = self.regions.len() * self.region_bytes;
        let last = self.volume_bytes.div_ceil(self.region_bytes) - 1;
        if self.regions.contains(last) {
            full - (self.region_bytes - self.region_length(last))
        } else {
            full
        }
    }

    /// Bytes a pass has to send: whole regions, and only the parts of
    /// regions pending in parts.
    pub(crate) fn bytes(&self) -> u64 {
        self.pending_bytes
    }

    /// The bytes a part of a region is made of.
    pub(crate) fn part_bytes(&self) -> u64 {
        self.part_bytes
    }

    /// The bytes the parts in `mask` of `region` hold (the last region may
    /// end inside a part, or before it).
    fn mask_bytes(&self, region: u64, mask: u64) -> u64 {
        let length = self.region_length(region);
        if length == self.region_bytes {
            return u64::from(mask.count_ones()) * self.part_bytes;
        }
        (0..64u64)
            .filter(|part| mask & (1 << part) != 0)
            .map(|part| (part * self.part_bytes).min(length).abs_diff(((part + 1) * self.part_bytes).min(length)))
            .sum()
    }

    /// The mask of every part of a region.
    fn all_parts(&self) -> u64 {
        let parts = self.region_bytes / self.part_bytes;
        if parts == 64 {
            u64::MAX
        } else {
            (1 << parts) - 1
        }
    }

    /// What `region` pending now costs a pass.
    fn pending_of(&self, region: u64) -> u64 {
        match self.parts.get(&region) {
            Some(&mask) => self.mask_bytes(region, mask),
            None if self.regions.contains(region) => self.region_length(region),
            None => 0,
        }
    }

    /// `region` now costs `after` instead of `before`: the running pass's
    /// total follows.
    fn repriced(&mut self, before: u64, after: u64) {
        self.pending_bytes = self.pending_bytes - before + after;
        if self.running {
            self.bytes_total = self.bytes_total - before + after;
        }
    }

    /// The copy may lack `region` whole; a running pass now has it to send too.
    pub(crate) fn insert(&mut self, region: u64) {
        let before = self.pending_of(region);
        self.regions.insert(region);
        self.parts.remove(&region);
        self.repriced(before, self.region_length(region));
    }

    /// The copy may lack exactly the `length` bytes at `offset` (and has, or
    /// has queued, every other byte of their regions unless those are
    /// already pending): their regions become pending in the parts they
    /// touch; a region already pending whole stays whole.
    pub(crate) fn insert_extent(&mut self, offset: u64, length: u64) {
        if length == 0 {
            return;
        }
        let end = offset + length;
        for region in offset / self.region_bytes..(end - 1) / self.region_bytes + 1 {
            let start = region * self.region_bytes;
            let first = (offset.max(start) - start) / self.part_bytes;
            let last = (end.min(start + self.region_bytes) - 1 - start) / self.part_bytes;
            let touched = (u64::MAX >> (63 - last)) & (u64::MAX << first);
            let before = self.pending_of(region);
            let mask = match self.parts.get(&region) {
                Some(&mask) => mask | touched,
                None if self.regions.contains(region) => continue,
                None => touched,
            };
            self.regions.insert(region);
            if mask == self.all_parts() {
                self.parts.remove(&region);
            } else {
                self.parts.insert(region, mask);
            }
            let after = self.pending_of(region);
            self.repriced(before, after);
        }
    }

    /// The parts `region` is pending in; `None` when it is pending whole
    /// (or not at all).
    pub(crate) fn parts_of(&self, region: u64) -> Option<u64> {
        self.parts.get(&region).copied()
    }

    /// Whether `region` is pending whole.
    pub(crate) fn contains_whole(&self, region: u64) -> bool {
        self.regions.contains(region) && !self.parts.contains_key(&region)
    }

    /// `region` needs no resync after all (`--assume-clean`).
    pub(crate) fn remove(&mut self, region: u64) {
        let before = self.pending_of(region);
        self.regions.remove(region);
        self.parts.remove(&region);
        self.repriced(before, 0);
    }

    /// A pass queued `regions` whole: they leave the set and count as done.
    pub(crate) fn take(&mut self, regions: std::ops::Range<u64>) {
        for region in regions {
            let pending = self.pending_of(region);
            if self.regions.remove(region) {
                self.parts.remove(&region);
                self.pending_bytes -= pending;
                self.bytes_done += pending;
            }
        }
        self.check_progress();
    }

    /// A pass queued the parts `mask` of `region`, pending in parts: they
    /// count as done, and the region leaves the set with its last part.
    pub(crate) fn take_parts(&mut self, region: u64, mask: u64) {
        let pending = self.parts.get(&region).copied().expect("the region is pending in parts");
        assert_eq!(pending & mask, mask, "a pass takes only parts that are pending");
        let taken = self.mask_bytes(region, mask);
        self.pending_bytes -= taken;
        self.bytes_done += taken;
        if pending == mask {
            self.parts.remove(&region);
            self.regions.remove(region);
        } else {
            self.parts.insert(region, pending & !mask);
        }
        self.check_progress();
    }

    fn check_progress(&self) {
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
        self.bytes_total = self.pending_bytes;
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
        self.parts.clear();
        self.pending_bytes = 0;
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

    /// Parts: a 64th of a region (4 KiB of 256 KiB here). An extent marks
    /// the parts it touches in each of its regions; parts merge; a region
    /// marked in every part, or pending whole, is whole; the last, short
    /// region counts only its bytes; taking parts counts them done, and a
    /// region leaves with its last part.
    #[test]
    fn parts_are_merged_counted_and_taken() {
        const REGION: u64 = 256 << 10;
        let mut set = ResyncSet::new(3 * REGION + 6000, REGION);
        assert_eq!(set.part_bytes(), 4096);
        set.insert_extent(4096 + 100, 10);
        assert_eq!((set.parts_of(0), set.bytes(), set.region_bytes()), (Some(0b10), 4096, REGION));
        set.insert_extent(8192 - 1, 2); // the end of part 1 and the start of part 2
        assert_eq!((set.parts_of(0), set.bytes()), (Some(0b110), 8192));
        // Across a region boundary: the last part of region 0, the first of region 1.
        set.insert_extent(REGION - 1, 2);
        assert_eq!(set.parts_of(0), Some(0b110 | 1 << 63));
        assert_eq!(set.parts_of(1), Some(1));
        assert_eq!(set.bytes(), 4 * 4096);
        // Every part of region 2: whole.
        set.insert_extent(2 * REGION, REGION);
        assert!(set.contains_whole(2) && set.parts_of(2).is_none());
        // Pending whole stays whole.
        set.insert(1);
        set.insert_extent(REGION + 8192, 1);
        assert!(set.contains_whole(1));
        assert_eq!(set.bytes(), 3 * 4096 + 2 * REGION);
        // The last region is 6,000 bytes: its part 1 holds 1,904 of them.
        set.insert_extent(3 * REGION + 5000, 1000);
        assert_eq!((set.parts_of(3), set.bytes()), (Some(0b10), 3 * 4096 + 2 * REGION + 1904));
        assert_eq!(set.region_bytes(), 3 * REGION + 6000);

        set.start_pass();
        let total = set.bytes();
        assert_eq!(set.bytes_total(), total);
        set.take_parts(0, 0b110);
        assert!(set.contains(0));
        set.insert_extent(4096, 1); // missed again during the pass
        assert_eq!(set.bytes_total(), total + 4096);
        set.take_parts(0, 0b10 | 1 << 63);
        assert!(!set.contains(0), "the region left with its last part");
        set.take(1..3);
        set.take_parts(3, 0b10);
        assert_eq!((set.len(), set.bytes(), set.bytes_done(), set.bytes_total()), (0, 0, total + 4096, total + 4096));
        set.insert_extent(4096, 1);
        set.clear_all();
        assert_eq!((set.len(), set.bytes(), set.parts_of(0)), (0, 0, None));
    }
}
