//! Percentiles of a sample.

use std::cmp::Ordering;
use std::time::Duration;

/// A value with a total order for sorting a sample: the integers, [`Duration`], and the
/// floats ordered by [`f64::total_cmp`] (a NaN sorts after every number instead of making
/// the sort panic or misbehave).
pub trait Ordered: Copy {
    /// The total order used by [`sort`].
    fn order(&self, other: &Self) -> Ordering;
}

macro_rules! ordered_by_ord {
    ($($t:ty),*) => {
        $(impl Ordered for $t {
            fn order(&self, other: &Self) -> Ordering {
                self.cmp(other)
            }
        })*
    };
}
ordered_by_ord!(u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize, Duration);

impl Ordered for f64 {
    fn order(&self, other: &Self) -> Ordering {
        self.total_cmp(other)
    }
}

impl Ordered for f32 {
    fn order(&self, other: &Self) -> Ordering {
        self.total_cmp(other)
    }
}

/// Sort a sample in place, ascending (see [`Ordered`] for floats).
pub fn sort<T: Ordered>(v: &mut [T]) {
    v.sort_unstable_by(T::order);
}

/// The `p` percentile (`p` in `0.0..=1.0`) of a **sorted** sample: the element at index
/// `round((len - 1) * p)`, or `None` for an empty sample.
///
/// It is the sample nearest to the linearly interpolated rank, without interpolating: the
/// result is always a measured value, `p = 0.0` is the minimum, `p = 1.0` the maximum, and
/// `p = 0.5` the middle element (of an even-sized sample, the upper of the two middle ones:
/// `round` goes half away from zero). This is the definition every harness of the repository
/// used before this crate existed, so figures stay comparable.
///
/// # Panics
/// If `p` is not within `0.0..=1.0` (a NaN included).
pub fn percentile<T: Copy>(sorted: &[T], p: f64) -> Option<T> {
    assert!((0.0..=1.0).contains(&p), "percentile {p} outside 0..=1");
    if sorted.is_empty() {
        return None;
    }
    Some(sorted[((sorted.len() - 1) as f64 * p).round() as usize])
}

/// A sample sorted once, for reading several percentiles of it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample<T> {
    sorted: Vec<T>,
}

impl<T: Ordered> Sample<T> {
    /// Collect and sort the values.
    pub fn new(values: impl IntoIterator<Item = T>) -> Sample<T> {
        let mut sorted: Vec<T> = values.into_iter().collect();
        sort(&mut sorted);
        Sample { sorted }
    }

    /// The `p` percentile, as defined by [`percentile`]; `None` if the sample is empty.
    pub fn percentile(&self, p: f64) -> Option<T> {
        percentile(&self.sorted, p)
    }

    /// The median (`percentile(0.5)`).
    pub fn median(&self) -> Option<T> {
        self.percentile(0.5)
    }

    /// The smallest value.
    pub fn min(&self) -> Option<T> {
        self.sorted.first().copied()
    }

    /// The largest value.
    pub fn max(&self) -> Option<T> {
        self.sorted.last().copied()
    }

    /// How many values the sample holds.
    pub fn len(&self) -> usize {
        self.sorted.len()
    }

    /// Whether the sample holds no value.
    pub fn is_empty(&self) -> bool {
        self.sorted.is_empty()
    }

    /// How many values are strictly greater than `limit`.
    pub fn count_above(&self, limit: T) -> usize {
        self.sorted.len() - self.sorted.partition_point(|v| v.order(&limit) != Ordering::Greater)
    }

    /// The values, ascending.
    pub fn as_sorted(&self) -> &[T] {
        &self.sorted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_picks_the_element_at_the_rounded_rank() {
        let v: Vec<u64> = (1..=10).collect();
        assert_eq!(percentile(&v, 0.0), Some(1));
        assert_eq!(percentile(&v, 1.0), Some(10));
        // Index round(9 * 0.5) = round(4.5) = 5: the upper middle element.
        assert_eq!(percentile(&v, 0.5), Some(6));
        // round(9 * 0.9) = round(8.1) = 8; round(9 * 0.99) = round(8.91) = 9.
        assert_eq!(percentile(&v, 0.9), Some(9));
        assert_eq!(percentile(&v, 0.99), Some(10));
        // round(9 * 0.1) = round(0.9) = 1.
        assert_eq!(percentile(&v, 0.1), Some(2));
        // Odd size: the exact middle.
        assert_eq!(percentile(&[3u64, 5, 9], 0.5), Some(5));
    }

    #[test]
    fn percentile_of_edge_samples() {
        assert_eq!(percentile::<u64>(&[], 0.5), None);
        assert_eq!(percentile(&[7u64], 0.0), Some(7));
        assert_eq!(percentile(&[7u64], 1.0), Some(7));
        // The median of an even-sized sample of len 2k is element k (as `v[len / 2]`).
        for len in 1..50usize {
            let v: Vec<usize> = (0..len).collect();
            assert_eq!(percentile(&v, 0.5), Some(len / 2), "len {len}");
        }
    }

    #[test]
    #[should_panic(expected = "outside 0..=1")]
    fn percentile_rejects_p_above_one() {
        percentile(&[1u64, 2], 50.0);
    }

    #[test]
    fn sample_sorts_floats_totally() {
        let s = Sample::new([3.0, f64::NAN, -1.0, 2.5, f64::INFINITY]);
        assert_eq!(s.min(), Some(-1.0));
        assert_eq!(s.as_sorted()[..4], [-1.0, 2.5, 3.0, f64::INFINITY]);
        assert!(s.max().unwrap().is_nan(), "NaN sorts last");
        assert_eq!(s.median(), Some(3.0));
        assert_eq!(s.len(), 5);
    }

    #[test]
    fn sample_of_unsorted_integers() {
        let s = Sample::new([9u64, 1, 8, 2, 7, 3, 6, 4, 5, 10]);
        assert_eq!(s.as_sorted(), (1..=10).collect::<Vec<u64>>().as_slice());
        assert_eq!(s.percentile(0.9), Some(9));
        assert_eq!(s.count_above(7), 3);
        assert_eq!(s.count_above(10), 0);
        assert_eq!(s.count_above(0), 10);
        let empty = Sample::<u64>::new([]);
        assert!(empty.is_empty());
        assert_eq!((empty.median(), empty.min(), empty.max()), (None, None, None));
    }

    #[test]
    fn sample_of_durations() {
        let ms = Duration::from_millis;
        let s = Sample::new([ms(30), ms(10), ms(20)]);
        assert_eq!(s.median(), Some(ms(20)));
        assert_eq!(s.count_above(ms(10)), 2);
    }
}
