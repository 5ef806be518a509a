//! Per-tenant values by tenant id, in chunks that never move: the
//! sequencer's seqs and the catch-up index's tails, one entry per tenant
//! ever seen.
//!
//! Why not a `HashMap<Arc<str>, T>` (the index's tails): with 100,000
//! tenants that table is one ~17 MB block, and growing it holds the old and
//! the new block at once (+26 MB at the peak of a 100,000-tenant drain, all
//! of it kept as the process's high-water mark). Here each tenant's name
//! sits next to its value in fixed chunks, so growing costs one chunk, and
//! the hash table holds only slot numbers: 5 bytes a bucket instead of 25
//! for a `HashMap<Arc<str>, u32>` (100,000 tenants: 0.7 MB instead of 3.3,
//! the names' 16 bytes each moving into the chunks).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::HashTable;

/// Values per chunk.
const CHUNK: usize = 1024;

#[derive(Debug, Clone)]
pub struct ByTenant<T> {
    /// Slot numbers, hashed by their tenant's name (in `chunks`).
    slots: HashTable<u32>,
    /// Keyed SipHash, like `HashMap`'s: tenant ids come from outside.
    hasher: RandomState,
    chunks: Vec<Vec<(Arc<str>, T)>>,
}

impl<T> Default for ByTenant<T> {
    fn default() -> Self {
        ByTenant {
            slots: HashTable::new(),
            hasher: RandomState::new(),
            chunks: Vec::new(),
        }
    }
}

impl<T: Default> ByTenant<T> {
    /// Tenants held.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn get(&self, tenant: &str) -> Option<&T> {
        self.find(tenant).map(|slot| self.at(slot))
    }

    /// The tenant's value, a default one if the tenant is new.
    pub fn get_or_default(&mut self, tenant: &Arc<str>) -> &mut T {
        let slot = self.slot(tenant);
        self.at_mut(slot)
    }

    /// The tenant's slot (added with a default value if new): a caller
    /// with many values of one tenant in a row looks it up once.
    pub fn slot(&mut self, tenant: &Arc<str>) -> u32 {
        match self.find(tenant) {
            Some(slot) => slot,
            None => self.add(tenant.clone()),
        }
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.chunks.iter_mut().flatten().map(|(_, value)| value)
    }

    /// Every tenant with its value, taken out.
    pub fn into_entries(self) -> impl Iterator<Item = (Arc<str>, T)> {
        self.chunks.into_iter().flatten()
    }

    /// The tenant's slot, if it has one.
    pub fn find(&self, tenant: &str) -> Option<u32> {
        let chunks = &self.chunks;
        self.slots
            .find(self.hasher.hash_one(tenant), |&slot| {
                *entry(chunks, slot).0 == *tenant
            })
            .copied()
    }

    /// Adds a tenant that has no slot yet (see [`ByTenant::find`]) with a
    /// default value.
    pub fn add(&mut self, tenant: Arc<str>) -> u32 {
        let slot = self.slots.len();
        if slot.is_multiple_of(CHUNK) {
            self.chunks.push(Vec::with_capacity(CHUNK));
        }
        let hash = self.hasher.hash_one(&*tenant);
        if let Some(chunk) = self.chunks.last_mut() {
            chunk.push((tenant, T::default()));
        }
        // u32: four billion tenants would need ~500 GB of index first.
        let slot = slot as u32;
        let (chunks, hasher) = (&self.chunks, &self.hasher);
        self.slots
            .insert_unique(hash, slot, |&s| hasher.hash_one(&*entry(chunks, s).0));
        slot
    }

    fn at(&self, slot: u32) -> &T {
        &entry(&self.chunks, slot).1
    }

    /// The value in `slot` (from [`ByTenant::slot`]).
    pub fn at_mut(&mut self, slot: u32) -> &mut T {
        self.entry_mut(slot).1
    }

    /// The tenant's shared name and value in `slot`.
    pub fn entry_mut(&mut self, slot: u32) -> (&Arc<str>, &mut T) {
        let slot = slot as usize;
        let (name, value) = &mut self.chunks[slot / CHUNK][slot % CHUNK];
        (name, value)
    }

    /// Every tenant with its value.
    #[cfg(test)]
    pub fn iter(&self) -> impl Iterator<Item = (&Arc<str>, &T)> {
        self.chunks
            .iter()
            .flatten()
            .map(|(name, value)| (name, value))
    }
}

fn entry<T>(chunks: &[Vec<(Arc<str>, T)>], slot: u32) -> &(Arc<str>, T) {
    let slot = slot as usize;
    &chunks[slot / CHUNK][slot % CHUNK]
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn values_stay_with_their_tenants_across_chunks() {
        let mut by = ByTenant::<u64>::default();
        let names: Vec<Arc<str>> = (0..3 * CHUNK + 5)
            .map(|i| Arc::from(format!("t{i}")))
            .collect();
        for (i, name) in names.iter().enumerate() {
            *by.get_or_default(name) += i as u64 + 1;
        }
        *by.get_or_default(&names[CHUNK]) += 1000;
        assert_eq!(by.len(), names.len());
        assert_eq!(by.get("t0"), Some(&1));
        assert_eq!(by.get(&format!("t{CHUNK}")), Some(&(CHUNK as u64 + 1001)));
        assert_eq!(by.get("nobody"), None);
        assert_eq!(by.values_mut().count(), names.len());
        let entries: HashMap<String, u64> = by
            .into_entries()
            .map(|(tenant, v)| (tenant.to_string(), v))
            .collect();
        let expected: HashMap<String, u64> = names
            .iter()
            .enumerate()
            .map(|(i, name)| {
                let bumped = if i == CHUNK { 1000 } else { 0 };
                (name.to_string(), i as u64 + 1 + bumped)
            })
            .collect();
        assert_eq!(entries, expected);
    }
}
