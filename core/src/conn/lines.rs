//! The JSON form on TCP: newline-delimited lines split off the read buffer,
//! each line searched once however many reads it arrives in, and a line over
//! the limit dropped up to its newline without being buffered.

use bytes::BytesMut;

/// What [`LineSplitter::next`] found at the front of the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Split {
    /// A whole line, its newline included.
    Line(BytesMut),
    /// A line over the limit was dropped (all of it, or what arrived so far
    /// with the rest to be skipped up to its newline): it gets `too_large`.
    TooLong,
    /// No whole line yet: read more.
    Incomplete,
}

/// The splitter's memory between reads.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct LineSplitter {
    /// A line over the limit is being dropped up to its newline.
    skipping: bool,
    /// Bytes at the front of the read buffer already searched for a newline,
    /// so a long line arriving in many reads is scanned once.
    scanned: u32,
}

impl LineSplitter {
    /// Splits the next line of at most `max` bytes off `input`.
    pub(super) fn next(&mut self, input: &mut BytesMut, max: usize) -> Split {
        loop {
            let from = (self.scanned as usize).min(input.len());
            match memchr_nl(&input[from..]) {
                Some(i) => {
                    self.scanned = 0;
                    let line = input.split_to(from + i + 1);
                    if self.skipping {
                        self.skipping = false;
                        continue;
                    }
                    if line.len() > max {
                        return Split::TooLong;
                    }
                    return Split::Line(line);
                }
                None => {
                    if input.len() > max {
                        input.clear();
                        self.scanned = 0;
                        if !self.skipping {
                            self.skipping = true;
                            return Split::TooLong;
                        }
                    } else {
                        // `input` is at most `max` (a frame size) here.
                        self.scanned = u32::try_from(input.len()).unwrap_or(u32::MAX);
                    }
                    return Split::Incomplete;
                }
            }
        }
    }
}

fn memchr_nl(b: &[u8]) -> Option<usize> {
    b.iter().position(|&c| c == b'\n')
}
