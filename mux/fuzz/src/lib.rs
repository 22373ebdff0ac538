//! What the fuzz targets share.

/// A few proper prefix lengths of `data`, where a parser given only that much
/// must not contradict its verdict on the whole. Most come from the input's
/// own first bytes, scaled to its length, so that the fuzzer learns to steer
/// them; the rest are where off-by-one bugs live.
pub fn split_points(data: &[u8]) -> impl Iterator<Item = usize> {
    let len = data.len();
    let steered = data
        .iter()
        .take(4)
        .map(move |&b| usize::from(b) * len / 256);
    let fixed = [0, 1, len.saturating_sub(1)];
    steered.chain(fixed).filter(move |&end| end < len)
}
