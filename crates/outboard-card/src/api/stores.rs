//! The card's backing stores: one or more block devices or files, each with its own volume
//! table, and one namespace of volume names across them.
//!
//! A store is named by its path as given on the command line. Opening refuses a store listed
//! twice (same device id) and a volume name held by two stores, so that every name the API
//! takes means exactly one volume.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use outboard_card_storage::backing::Backing;
use outboard_card_storage::table::{Volume, VolumeStore};

/// One open store: its table and its data file.
pub struct Store {
    pub path: PathBuf,
    pub table: VolumeStore,
    pub backing: Arc<Backing>,
}

impl Store {
    /// The name clients use for it.
    pub fn name(&self) -> String {
        self.path.display().to_string()
    }
}

/// Every store of the card, in command-line order.
pub struct Stores(Vec<Store>);

impl Stores {
    /// Opens each store's volume table and data file.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        if paths.is_empty() {
            bail!("No backing store given");
        }
        let mut stores: Vec<Store> = Vec::with_capacity(paths.len());
        for path in paths {
            let table = VolumeStore::open(path)
                .with_context(|| format!("Cannot open backing store {}", path.display()))?;
            if let Some(other) = stores
                .iter()
                .find(|s| s.table.table().device_id == table.table().device_id)
            {
                bail!(
                    "Backing stores {} and {} have one device id (the same store twice, or a copy)",
                    other.path.display(),
                    path.display()
                );
            }
            let backing = Arc::new(
                Backing::open(path)
                    .with_context(|| format!("Cannot open backing store {}", path.display()))?,
            );
            stores.push(Store {
                path: path.clone(),
                table,
                backing,
            });
        }
        let mut names: HashMap<&str, &Path> = HashMap::new();
        for s in &stores {
            for v in &s.table.table().volumes {
                if let Some(first) = names.insert(&v.name, &s.path) {
                    bail!(
                        "Volume {} is on two backing stores, {} and {}: names must be unique \
                         across the card",
                        v.name,
                        first.display(),
                        s.path.display()
                    );
                }
            }
        }
        Ok(Self(stores))
    }

    pub fn iter(&self) -> impl Iterator<Item = &Store> {
        self.0.iter()
    }

    pub fn get_mut(&mut self, i: usize) -> &mut Store {
        &mut self.0[i]
    }

    pub fn get(&self, i: usize) -> &Store {
        &self.0[i]
    }

    /// The store holding volume `name` and the volume.
    pub fn find(&self, name: &str) -> Option<(usize, &Volume)> {
        self.0
            .iter()
            .enumerate()
            .find_map(|(i, s)| s.table.table().volume(name).map(|v| (i, v)))
    }

    /// The store named `name`.
    pub fn by_name(&self, name: &str) -> Option<usize> {
        self.0.iter().position(|s| s.name() == name)
    }

    /// The store with the most free bytes (the first of equals).
    pub fn roomiest(&self) -> usize {
        let mut best = 0;
        let mut free = 0;
        for (i, s) in self.0.iter().enumerate() {
            let f = s.table.table().free_bytes();
            if i == 0 || f > free {
                best = i;
                free = f;
            }
        }
        best
    }

    /// Free bytes over all stores.
    pub fn free_bytes(&self) -> u64 {
        self.0.iter().map(|s| s.table.table().free_bytes()).sum()
    }
}
