//! Property tests for the write-intent bitmap: after any sequence of marks,
//! clears and full-sync requests its bits equal a plain set of (slot, region)
//! pairs, they survive a reopen, and a mark always covers every byte written
//! (DESIGN.md §4, invariant 6).

use std::collections::BTreeSet;
use std::path::Path;

use engine::bitmap::WriteIntentBitmap;
use proptest::prelude::*;

const REGION_BYTES: u64 = 4096;

#[derive(Debug, Clone)]
enum Operation {
    Mark { offset: u64, len: u64 },
    Clear { slot: u32, region: u64 },
    ClearRange { slot: u32, offset: u64, len: u64 },
    SetAll { slot: u32 },
    Flush,
}

/// An extent inside the volume, as (offset, len), possibly empty.
fn extent(volume_size: u64) -> impl Strategy<Value = (u64, u64)> {
    (0..volume_size).prop_flat_map(move |offset| (Just(offset), 0..=(volume_size - offset).min(40_000)))
}

fn operation(volume_size: u64, slots: u32) -> impl Strategy<Value = Operation> {
    let regions = volume_size.div_ceil(REGION_BYTES);
    prop_oneof![
        4 => extent(volume_size).prop_map(|(offset, len)| Operation::Mark { offset, len }),
        2 => (0..slots, 0..regions).prop_map(|(slot, region)| Operation::Clear { slot, region }),
        2 => (0..slots, extent(volume_size)).prop_map(|(slot, (offset, len))| Operation::ClearRange { slot, offset, len }),
        1 => (0..slots).prop_map(|slot| Operation::SetAll { slot }),
        1 => Just(Operation::Flush),
    ]
}

fn scenario() -> impl Strategy<Value = (u64, u32, Vec<Operation>)> {
    (1u64..300_000, 1u32..=8).prop_flat_map(|(volume_size, slots)| {
        (Just(volume_size), Just(slots), proptest::collection::vec(operation(volume_size, slots), 0..40))
    })
}

/// The model: the set of (slot, region) pairs that are dirty.
fn apply(model: &mut BTreeSet<(u32, u64)>, operation: &Operation, volume_size: u64, slots: u32) {
    let regions = volume_size.div_ceil(REGION_BYTES);
    match *operation {
        Operation::Mark { offset, len } if len > 0 => {
            for region in offset / REGION_BYTES..=(offset + len - 1) / REGION_BYTES {
                for slot in 0..slots {
                    model.insert((slot, region));
                }
            }
        }
        Operation::Mark { .. } | Operation::Flush => {}
        Operation::Clear { slot, region } => {
            model.remove(&(slot, region));
        }
        Operation::ClearRange { slot, offset, len } => {
            for region in 0..regions {
                let start = region * REGION_BYTES;
                let end = (start + REGION_BYTES).min(volume_size);
                if offset <= start && end <= offset + len {
                    model.remove(&(slot, region));
                }
            }
        }
        Operation::SetAll { slot } => {
            for region in 0..regions {
                model.insert((slot, region));
            }
        }
    }
}

fn perform(bitmap: &WriteIntentBitmap, operation: &Operation) {
    match *operation {
        Operation::Mark { offset, len } => {
            if bitmap.mark(offset, len) {
                bitmap.flush().unwrap();
            }
        }
        Operation::Clear { slot, region } => bitmap.clear(slot, region),
        Operation::ClearRange { slot, offset, len } => bitmap.clear_range(slot, offset, len),
        Operation::SetAll { slot } => bitmap.set_all(slot),
        Operation::Flush => bitmap.flush().unwrap(),
    }
}

fn bits(bitmap: &WriteIntentBitmap) -> BTreeSet<(u32, u64)> {
    (0..bitmap.slots()).flat_map(|slot| bitmap.dirty_regions(slot).map(move |region| (slot, region))).collect()
}

fn open(path: &Path, volume_size: u64, slots: u32) -> WriteIntentBitmap {
    WriteIntentBitmap::open_or_create(path, volume_size, REGION_BYTES, slots).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// After any operations the bits equal the model, dirty_bytes agrees with
    /// it, and after a flush and a reopen the same bits are still there.
    #[test]
    fn bits_follow_the_model_and_persist((volume_size, slots, operations) in scenario()) {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("volume.cmbitmap");
        let bitmap = open(&path, volume_size, slots);
        let mut model = BTreeSet::new();
        for operation in &operations {
            perform(&bitmap, operation);
            apply(&mut model, operation, volume_size, slots);
            prop_assert_eq!(&bits(&bitmap), &model, "after {:?}", operation);
        }
        for slot in 0..slots {
            let expected: u64 = model
                .iter()
                .filter(|(model_slot, _)| *model_slot == slot)
                .map(|(_, region)| ((region + 1) * REGION_BYTES).min(volume_size) - region * REGION_BYTES)
                .sum();
            prop_assert_eq!(bitmap.dirty_bytes(slot), expected);
        }
        bitmap.close_clean().unwrap();
        drop(bitmap);
        prop_assert_eq!(bits(&open(&path, volume_size, slots)), model);
    }

    /// Invariant 6: after a mark (and its flush), every byte written lies in a
    /// region whose bit is set in every slot, and stays so across a reopen.
    #[test]
    fn marks_cover_every_byte_written(
        (volume_size, writes) in (1u64..1_000_000).prop_flat_map(|size| (Just(size), proptest::collection::vec(extent(size), 1..30)))
    ) {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("volume.cmbitmap");
        let slots = 3;
        let bitmap = open(&path, volume_size, slots);
        let covered = |bitmap: &WriteIntentBitmap, offset: u64, len: u64| {
            (offset..offset + len).step_by(512).chain((len > 0).then(|| offset + len - 1)).all(|byte| {
                (0..slots).all(|slot| bitmap.is_set(slot, byte / REGION_BYTES))
            })
        };
        for &(offset, len) in &writes {
            if bitmap.mark(offset, len) {
                bitmap.flush().unwrap();
            }
            prop_assert!(covered(&bitmap, offset, len), "write of {} bytes at {} not covered", len, offset);
            prop_assert!(!bitmap.mark(offset, len), "flushed marks need no second flush");
        }
        drop(bitmap);
        let reopened = open(&path, volume_size, slots);
        for &(offset, len) in &writes {
            prop_assert!(covered(&reopened, offset, len), "write of {} bytes at {} lost on reopen", len, offset);
        }
    }
}
