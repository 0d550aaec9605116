//! A deque that costs one pointer while it has no allocation: most sessions
//! never have a message in flight or waiting, so their queues take 8 bytes,
//! not 32. An emptied deque keeps its room until its owner calls
//! [`ThinDeque::release_if_empty`] (once per read pass, not per packet), so a
//! busy client does not allocate and free it for every packet.

use std::collections::VecDeque;

// The box is the point: an empty deque is one null pointer, not the 32
// bytes of an unallocated `VecDeque`.
#[allow(clippy::box_collection)]
#[derive(Debug, Clone)]
pub(super) struct ThinDeque<T>(Option<Box<VecDeque<T>>>);

impl<T> Default for ThinDeque<T> {
    fn default() -> Self {
        ThinDeque(None)
    }
}

impl<T> ThinDeque<T> {
    pub(super) fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |d| d.len())
    }

    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(super) fn push_back(&mut self, v: T) {
        self.0.get_or_insert_with(Box::default).push_back(v);
    }

    pub(super) fn front(&self) -> Option<&T> {
        self.0.as_ref()?.front()
    }

    pub(super) fn pop_front(&mut self) -> Option<T> {
        self.0.as_mut()?.pop_front()
    }

    pub(super) fn remove(&mut self, i: usize) -> Option<T> {
        self.0.as_mut()?.remove(i)
    }

    /// Whether the deque holds an allocation.
    #[cfg(test)]
    pub(super) fn is_allocated(&self) -> bool {
        self.0.is_some()
    }

    /// Gives the room back if the deque is empty.
    pub(super) fn release_if_empty(&mut self) {
        if self.is_empty() {
            self.0 = None;
        }
    }

    pub(super) fn get_mut(&mut self, i: usize) -> Option<&mut T> {
        self.0.as_mut()?.get_mut(i)
    }

    pub(super) fn iter(&self) -> impl Iterator<Item = &T> {
        self.0.iter().flat_map(|d| d.iter())
    }

    pub(super) fn clear(&mut self) {
        self.0 = None;
    }
}

impl<T> IntoIterator for ThinDeque<T> {
    type Item = T;
    type IntoIter = std::iter::Flatten<std::option::IntoIter<VecDeque<T>>>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.map(|d| *d).into_iter().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::ThinDeque;
    use proptest::prelude::*;
    use std::collections::VecDeque;

    proptest! {
        /// The deque behaves as a `VecDeque` under any sequence of
        /// operations, and holds no allocation once released while empty.
        #[test]
        fn behaves_as_a_vecdeque(ops in proptest::collection::vec((0u8..5, any::<u16>()), 0..200)) {
            let mut thin = ThinDeque::default();
            let mut model = VecDeque::new();
            for (op, v) in ops {
                match op {
                    0 | 1 => { thin.push_back(v); model.push_back(v); }
                    2 => prop_assert_eq!(thin.pop_front(), model.pop_front()),
                    3 if !model.is_empty() => {
                        let i = usize::from(v) % model.len();
                        prop_assert_eq!(thin.remove(i), model.remove(i));
                    }
                    3 => {}
                    _ => { thin.clear(); model.clear(); }
                }
                if v % 3 == 0 {
                    thin.release_if_empty();
                    prop_assert_eq!(thin.0.is_none(), model.is_empty());
                }
                prop_assert_eq!(thin.len(), model.len());
                prop_assert_eq!(thin.front(), model.front());
                prop_assert!(thin.0.is_some() || model.is_empty());
                prop_assert!(thin.iter().eq(model.iter()));
            }
            prop_assert!(thin.into_iter().eq(model.into_iter()));
        }
    }
}
