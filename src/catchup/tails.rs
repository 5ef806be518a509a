//! Per-tenant values by tenant id, in chunks that never move.
//!
//! Why not a `HashMap<Arc<str>, T>` of the index's tails: with 100,000
//! tenants that table is one ~17 MB block, and growing it holds the old and
//! the new block at once (+26 MB at the peak of a 100,000-tenant drain, all
//! of it kept as the process's high-water mark). Here the hash table holds
//! a slot number (24 bytes a tenant) and the values sit in fixed chunks,
//! so growing costs one chunk.

use std::collections::HashMap;
use std::sync::Arc;

/// Values per chunk.
const CHUNK: usize = 1024;

#[derive(Debug)]
pub struct ByTenant<T> {
    slots: HashMap<Arc<str>, u32>,
    chunks: Vec<Vec<T>>,
}

impl<T> Default for ByTenant<T> {
    fn default() -> Self {
        ByTenant {
            slots: HashMap::new(),
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
        self.slots.get(tenant).map(|&slot| self.at(slot))
    }

    /// The tenant's value, a default one if the tenant is new.
    pub fn get_or_default(&mut self, tenant: &Arc<str>) -> &mut T {
        let slot = self.slot(tenant);
        self.at_mut(slot)
    }

    /// The tenant's slot (added with a default value if new): a caller
    /// with many values of one tenant in a row looks it up once.
    pub fn slot(&mut self, tenant: &Arc<str>) -> u32 {
        match self.slots.get(tenant) {
            Some(&slot) => slot,
            None => self.add(tenant.clone()),
        }
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.chunks.iter_mut().flatten()
    }

    /// Every tenant with its value, taken out.
    pub fn into_entries(mut self) -> impl Iterator<Item = (Arc<str>, T)> {
        let slots = std::mem::take(&mut self.slots);
        slots
            .into_iter()
            .map(move |(tenant, slot)| (tenant, std::mem::take(self.at_mut(slot))))
    }

    fn add(&mut self, tenant: Arc<str>) -> u32 {
        let slot = self.slots.len();
        if slot.is_multiple_of(CHUNK) {
            self.chunks.push(Vec::with_capacity(CHUNK));
        }
        if let Some(chunk) = self.chunks.last_mut() {
            chunk.push(T::default());
        }
        // u32: four billion tenants would need ~500 GB of index first.
        let slot = slot as u32;
        self.slots.insert(tenant, slot);
        slot
    }

    fn at(&self, slot: u32) -> &T {
        let slot = slot as usize;
        &self.chunks[slot / CHUNK][slot % CHUNK]
    }

    /// The value in `slot` (from [`ByTenant::slot`]).
    pub fn at_mut(&mut self, slot: u32) -> &mut T {
        let slot = slot as usize;
        &mut self.chunks[slot / CHUNK][slot % CHUNK]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
