//! Feeding a byte stream to an incremental decoder in pieces, for the tests
//! and fuzz targets that check a decoder gives the same results however its
//! input is cut (as a socket cuts it).

use bytes::BytesMut;

/// Appends `data` to a buffer piece by piece (sizes taken from `pieces` in
/// turn; 0 counts as 1) and, after each piece, calls `next` on the buffer
/// until it needs more bytes. Returns every result in order, ending at the
/// first error.
pub fn decode_in_pieces<T, E>(
    data: &[u8],
    pieces: &[usize],
    mut next: impl FnMut(&mut BytesMut) -> Result<Option<T>, E>,
) -> Vec<Result<T, E>> {
    let mut buf = BytesMut::new();
    let mut out = Vec::new();
    let mut at = 0;
    let mut sizes = pieces.iter().copied().cycle();
    while at < data.len() {
        let n = sizes.next().unwrap_or(1).clamp(1, data.len() - at);
        buf.extend_from_slice(&data[at..at + n]);
        at += n;
        loop {
            match next(&mut buf) {
                Ok(Some(v)) => out.push(Ok(v)),
                Ok(None) => break,
                Err(e) => {
                    out.push(Err(e));
                    return out;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A decoder of lines: what it gives is cut from the buffer.
    fn line(b: &mut BytesMut) -> Result<Option<Vec<u8>>, String> {
        match b.iter().position(|&c| c == b'\n') {
            Some(i) if b[..i] == *b"bad" => Err("bad line".into()),
            Some(i) => {
                let l = b.split_to(i + 1);
                Ok(Some(l[..i].to_vec()))
            }
            None => Ok(None),
        }
    }

    #[test]
    fn pieces_cycle_and_the_first_error_ends_the_results() {
        let data = b"a\nbc\nbad\nd\n";
        let want = vec![
            Ok(b"a".to_vec()),
            Ok(b"bc".to_vec()),
            Err("bad line".to_string()),
        ];
        for pieces in [&[1usize][..], &[2, 5], &[0], &[], &[100]] {
            assert_eq!(decode_in_pieces(data, pieces, line), want, "{pieces:?}");
        }
    }
}
