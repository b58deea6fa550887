//! O_DIRECT alignment arithmetic, kept pure so it can be tested exhaustively.
//!
//! A client may read or write any byte range; with O_DIRECT the kernel only
//! takes ranges whose offset and length are multiples of the device's logical
//! block size, in buffers aligned the same way. A request is widened to the
//! aligned span that covers it; a write whose ends are not aligned needs the
//! edge blocks read first (read-modify-write).

/// How one client byte range maps onto aligned file I/O.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Aligned file offset where the I/O starts.
    pub file_offset: u64,
    /// Aligned length of the file I/O.
    pub file_len: u64,
    /// Bytes between `file_offset` and the client's offset.
    pub head: u64,
    /// The client's length.
    pub len: u64,
}

impl Span {
    /// Widen `offset..offset+len` to multiples of `alignment` (a power of
    /// two). With alignment 1 the span is the request itself.
    pub fn cover(offset: u64, len: u64, alignment: u64) -> Span {
        assert!(alignment.is_power_of_two(), "alignment must be a power of two");
        let mask = alignment - 1;
        let end = offset + len;
        let file_offset = offset & !mask;
        let file_end = (end + mask) & !mask;
        Span { file_offset, file_len: file_end - file_offset, head: offset - file_offset, len }
    }

    /// Bytes after the client's range up to the aligned end.
    pub fn tail(&self) -> u64 {
        self.file_len - self.head - self.len
    }

    /// Whether the first aligned block is only partly covered by the request.
    pub fn partial_head(&self) -> bool {
        self.head != 0
    }

    /// Whether the last aligned block is only partly covered by the request.
    pub fn partial_tail(&self) -> bool {
        self.tail() != 0
    }

    /// The aligned blocks (file offsets) that a write must read before it can
    /// be issued: at most two, one if head and tail fall in the same block.
    pub fn edge_blocks(&self, alignment: u64) -> Vec<u64> {
        let mut blocks = Vec::with_capacity(2);
        if self.partial_head() {
            blocks.push(self.file_offset);
        }
        if self.partial_tail() {
            let last = self.file_offset + self.file_len - alignment;
            if blocks.last() != Some(&last) {
                blocks.push(last);
            }
        }
        blocks
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn aligned_request_is_unchanged() {
        let span = Span::cover(8192, 4096, 4096);
        assert_eq!(span, Span { file_offset: 8192, file_len: 4096, head: 0, len: 4096 });
        assert!(span.edge_blocks(4096).is_empty());
    }

    #[test]
    fn small_write_inside_one_block_reads_that_block_once() {
        let span = Span::cover(4100, 10, 4096);
        assert_eq!(span.file_offset, 4096);
        assert_eq!(span.file_len, 4096);
        assert_eq!(span.edge_blocks(4096), vec![4096]);
    }

    proptest! {
        /// The span covers the request, is aligned, and is no wider than needed.
        #[test]
        fn span_covers_exactly(offset in 0u64..1 << 40, len in 1u64..1 << 26, shift in 0u32..13) {
            let alignment = 1u64 << shift;
            let span = Span::cover(offset, len, alignment);
            prop_assert_eq!(span.file_offset % alignment, 0);
            prop_assert_eq!(span.file_len % alignment, 0);
            prop_assert!(span.file_offset <= offset);
            prop_assert!(span.file_offset + span.file_len >= offset + len);
            prop_assert!(span.head < alignment);
            prop_assert!(span.tail() < alignment);
            prop_assert_eq!(span.file_offset + span.head, offset);
            for block in span.edge_blocks(alignment) {
                prop_assert_eq!(block % alignment, 0);
                prop_assert!(block >= span.file_offset);
                prop_assert!(block + alignment <= span.file_offset + span.file_len);
            }
        }
    }
}
