//! A randomized multi-tenant workload on the three tables, and the replay of
//! a stream back into tables, so tests can compare the two row for row.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio_postgres::Client;
use walcast::proto::change_event::{After, Before};
use walcast::proto::{Action, ChangeEvent, EditingLock, Project, Task};

/// What the workload did, for assertions.
#[derive(Debug, Default)]
pub struct Stats {
    pub committed_txs: usize,
    pub rolled_back_txs: usize,
    pub rolled_back_savepoints: usize,
    pub statements: usize,
}

/// Marker put in every value written by work that is rolled back.
pub const ROLLED_BACK: &str = "ROLLED-BACK-MARKER";

/// Inserts tasks `first..first + count` in one transaction, titled
/// `<label> #<i>`, task `i` for tenant `tenant-<i % tenants>`: a burst of
/// events where a test needs many at once.
pub async fn insert_tasks(client: &Client, label: &str, tenants: i32, first: i64, count: i64) {
    client
        .execute(
            "INSERT INTO tasks (id, tenant_id, title, status)
             SELECT gen_random_uuid(), 'tenant-' || (i % $2::int), $1::text || ' #' || i, 'todo'
             FROM generate_series($3::bigint, $3::bigint + $4::bigint - 1) AS i",
            &[&label, &tenants, &first, &count],
        )
        .await
        .unwrap_or_else(|e| panic!("insert {count} tasks ({label}): {e}"));
}

/// Drives random transactions; deterministic for a given seed.
pub struct Workload {
    rng: StdRng,
    pub tenants: Vec<String>,
    pub stats: Stats,
    counter: u64,
}

fn uuid(rng: &mut StdRng) -> String {
    let b: u128 = rng.random();
    let h = format!("{b:032x}");
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

impl Workload {
    pub fn new(seed: u64, tenants: usize) -> Workload {
        eprintln!("workload seed {seed} (replay with WALCAST_TEST_SEED={seed})");
        Workload {
            rng: StdRng::seed_from_u64(seed),
            tenants: (0..tenants).map(|i| format!("tenant-{i}")).collect(),
            stats: Stats::default(),
            counter: 0,
        }
    }

    /// The seed from `WALCAST_TEST_SEED`, else a random one (printed).
    pub fn seed() -> u64 {
        std::env::var("WALCAST_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(rand::random)
    }

    fn tenant(&mut self) -> String {
        let i = self.rng.random_range(0..self.tenants.len());
        self.tenants[i].clone()
    }

    fn text(&mut self, rolled_back: bool) -> String {
        self.counter += 1;
        let odd = [
            "plain",
            "ünïcödé ✓",
            "emoji 🚀🔥",
            "rtl שלום עולם",
            "quote ' \" \\ done",
            "newline\nand\ttab",
        ];
        let pick = odd[self.rng.random_range(0..odd.len())];
        if rolled_back {
            format!("{ROLLED_BACK} {}", self.counter)
        } else {
            format!("{pick} #{}", self.counter)
        }
    }

    /// Runs `count` transactions (some rolled back, some with rolled-back savepoints).
    pub async fn run(&mut self, client: &mut Client, count: usize) {
        for _ in 0..count {
            self.transaction(client).await;
        }
    }

    async fn transaction(&mut self, client: &mut Client) {
        let rollback = self.rng.random_bool(0.08);
        let tx = client.transaction().await.expect("begin");
        if self.rng.random_bool(0.2) {
            let actor = format!(
                r#"{{"actor_type":"agent","actor_id":"bot-{}","client_id":"{}"}}"#,
                self.rng.random_range(0..9),
                uuid(&mut self.rng)
            );
            tx.execute(
                "SELECT pg_logical_emit_message(true, 'walcast.actor', $1::text)",
                &[&actor],
            )
            .await
            .expect("emit actor");
        }
        let ops = self.rng.random_range(1..=4);
        for _ in 0..ops {
            self.operation(&tx, rollback).await;
        }
        if self.rng.random_bool(0.1) {
            tx.batch_execute("SAVEPOINT sp").await.expect("savepoint");
            self.operation(&tx, true).await;
            tx.batch_execute("ROLLBACK TO SAVEPOINT sp")
                .await
                .expect("rollback to savepoint");
            self.stats.rolled_back_savepoints += 1;
        }
        if rollback {
            tx.rollback().await.expect("rollback");
            self.stats.rolled_back_txs += 1;
        } else {
            tx.commit().await.expect("commit");
            self.stats.committed_txs += 1;
        }
    }

    async fn pick(
        &mut self,
        tx: &tokio_postgres::Transaction<'_>,
        sql: &str,
        tenant: &str,
    ) -> Option<String> {
        let rows = tx.query(sql, &[&tenant]).await.expect("pick a row");
        if rows.is_empty() {
            return None;
        }
        let i = self.rng.random_range(0..rows.len());
        Some(rows[i].get(0))
    }

    async fn operation(&mut self, tx: &tokio_postgres::Transaction<'_>, rolled_back: bool) {
        self.stats.statements += 1;
        let tenant = self.tenant();
        let text = self.text(rolled_back);
        let id = uuid(&mut self.rng);
        let client_id = uuid(&mut self.rng);
        match self.rng.random_range(0..100) {
            0..=14 => {
                tx.execute(
                    "INSERT INTO projects (id, tenant_id, name, description, updated_by, actor_type, client_id, metadata)
                     VALUES ($1::text::uuid, $2, $3, $4, 'alice', 'user', $5::text::uuid, $6::text::jsonb)",
                    &[&id, &tenant, &text, &(self.rng.random_bool(0.5).then_some(text.clone())), &client_id,
                      &(self.rng.random_bool(0.5).then_some(r#"{"color": "blue", "n": [1, 2.5, null]}"#))],
                )
                .await
                .expect("insert project");
            }
            15..=39 => {
                let project = self
                    .pick(
                        tx,
                        "SELECT id::text FROM projects WHERE tenant_id = $1 LIMIT 20",
                        &tenant,
                    )
                    .await;
                let project = project.filter(|_| self.rng.random_bool(0.5));
                let priority = self
                    .rng
                    .random_bool(0.7)
                    .then(|| self.rng.random_range(-5..100i32));
                tx.execute(
                    "INSERT INTO tasks (id, tenant_id, project_id, title, priority, assignee, due_at, updated_by, actor_type, client_id)
                     VALUES ($1::text::uuid, $2, $3::text::uuid, $4, $5, $6, now() + interval '3 days', 'bob', 'user', $7::text::uuid)",
                    &[&id, &tenant, &project, &text, &priority, &(self.rng.random_bool(0.5).then_some("carol")), &client_id],
                )
                .await
                .expect("insert task");
            }
            40..=59 => {
                let Some(task) = self
                    .pick(
                        tx,
                        "SELECT id::text FROM tasks WHERE tenant_id = $1 LIMIT 50",
                        &tenant,
                    )
                    .await
                else {
                    return;
                };
                let status = [
                    "todo",
                    "in_progress",
                    "blocked",
                    "done",
                    "done",
                    "cancelled",
                ][self.rng.random_range(0..6)];
                tx.execute(
                    "UPDATE tasks SET status = $2, title = $3, version = version + 1, updated_at = now(),
                            completed_at = CASE WHEN $2 = 'done' THEN now() END, updated_by = 'dave', description = NULL
                     WHERE id = $1::text::uuid",
                    &[&task, &status, &text],
                )
                .await
                .expect("update task");
            }
            60..=64 => {
                let Some(task) = self
                    .pick(
                        tx,
                        "SELECT id::text FROM tasks WHERE tenant_id = $1 LIMIT 50",
                        &tenant,
                    )
                    .await
                else {
                    return;
                };
                tx.execute("DELETE FROM tasks WHERE id = $1::text::uuid", &[&task])
                    .await
                    .expect("delete task");
            }
            65..=71 => {
                let Some(p) = self
                    .pick(
                        tx,
                        "SELECT id::text FROM projects WHERE tenant_id = $1 LIMIT 20",
                        &tenant,
                    )
                    .await
                else {
                    return;
                };
                let status = if self.rng.random_bool(0.5) {
                    "archived"
                } else {
                    "active"
                };
                tx.execute(
                    "UPDATE projects SET status = $2, name = $3, version = version + 1 WHERE id = $1::text::uuid",
                    &[&p, &status, &text],
                )
                .await
                .expect("update project");
            }
            72..=73 => {
                let Some(p) = self
                    .pick(tx, "SELECT id::text FROM projects p WHERE tenant_id = $1 AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.project_id = p.id) LIMIT 20", &tenant)
                    .await
                else {
                    return;
                };
                tx.execute("DELETE FROM projects WHERE id = $1::text::uuid", &[&p])
                    .await
                    .expect("delete project");
            }
            74..=83 => {
                let Some(task) = self
                    .pick(
                        tx,
                        "SELECT id::text FROM tasks WHERE tenant_id = $1 LIMIT 50",
                        &tenant,
                    )
                    .await
                else {
                    return;
                };
                let holder = format!(
                    "user-{}{}",
                    self.rng.random_range(0..4),
                    if rolled_back { ROLLED_BACK } else { "" }
                );
                tx.execute(
                    "INSERT INTO editing_locks (tenant_id, record_type, record_id, locked_by, locked_at, expires_at)
                     VALUES ($1, 'task', $2::text::uuid, $3, now(), now() + interval '30 seconds')
                     ON CONFLICT (tenant_id, record_type, record_id) DO UPDATE
                       SET locked_by = EXCLUDED.locked_by, expires_at = EXCLUDED.expires_at",
                    &[&tenant, &task, &holder],
                )
                .await
                .expect("acquire, refresh or transfer lock");
            }
            84..=91 => {
                let Some(record) = self
                    .pick(
                        tx,
                        "SELECT record_id::text FROM editing_locks WHERE tenant_id = $1",
                        &tenant,
                    )
                    .await
                else {
                    return;
                };
                if self.rng.random_bool(0.5) {
                    // Expire it first, so the delete is an expiry.
                    tx.execute(
                        "UPDATE editing_locks SET expires_at = now() - interval '1 second' WHERE tenant_id = $1 AND record_id = $2::text::uuid",
                        &[&tenant, &record],
                    )
                    .await
                    .expect("expire lock");
                }
                tx.execute(
                    "DELETE FROM editing_locks WHERE tenant_id = $1 AND record_id = $2::text::uuid",
                    &[&tenant, &record],
                )
                .await
                .expect("release lock");
            }
            _ => {
                // Multi-row change.
                tx.execute(
                    "UPDATE tasks SET priority = coalesce(priority, 0) + 1, version = version + 1 WHERE tenant_id = $1 AND status = 'todo'",
                    &[&tenant],
                )
                .await
                .expect("bulk update");
            }
        }
    }

    /// One large jsonb value (TOASTed), updated later without touching it.
    pub async fn big_jsonb(&mut self, client: &Client, megabytes: usize) {
        let tenant = self.tenant();
        let id = uuid(&mut self.rng);
        let blob: String = (0..megabytes * 1024 * 1024 / 16)
            .map(|i| format!("{:015x}", i * 2654435761 % 1_000_000_007))
            .collect::<Vec<_>>()
            .join(",");
        let json = format!(r#"{{"blob": "{blob}"}}"#);
        client
            .execute(
                "INSERT INTO projects (id, tenant_id, name, metadata) VALUES ($1::text::uuid, $2, 'big', $3::text::jsonb)",
                &[&id, &tenant, &json],
            )
            .await
            .expect("insert big jsonb");
        client
            .execute(
                "UPDATE projects SET name = 'big, renamed' WHERE id = $1::text::uuid",
                &[&id],
            )
            .await
            .expect("update next to big jsonb");
    }
}

/// Rows keyed by primary key, in the typed form events carry.
#[derive(Debug, Default, PartialEq)]
pub struct Tables {
    pub tasks: BTreeMap<String, Task>,
    pub projects: BTreeMap<String, Project>,
    pub locks: BTreeMap<String, EditingLock>,
}

fn lock_key(l: &EditingLock) -> String {
    format!("{}/{}/{}", l.tenant_id, l.record_type, l.record_id)
}

/// The key [`Tables`] holds the event's after image under.
fn after_id(e: &ChangeEvent) -> Option<String> {
    match &e.after {
        Some(After::Task(t)) => Some(t.id.clone()),
        Some(After::Project(p)) => Some(p.id.clone()),
        Some(After::Lock(l)) => Some(lock_key(l)),
        None => None,
    }
}

impl Tables {
    /// Applies one event, as a consumer keeping a replica would.
    pub fn apply(&mut self, e: &ChangeEvent) {
        // An UPDATE that changed the row's id (or lock record): the old row goes.
        match &e.before {
            Some(Before::TaskBefore(t)) if Some(&t.id) != after_id(e).as_ref() => {
                drop(self.tasks.remove(&t.id))
            }
            Some(Before::ProjectBefore(p)) if Some(&p.id) != after_id(e).as_ref() => {
                drop(self.projects.remove(&p.id))
            }
            Some(Before::LockBefore(l)) if Some(lock_key(l)) != after_id(e) => {
                drop(self.locks.remove(&lock_key(l)))
            }
            _ => {}
        }
        match (&e.after, &e.before) {
            (Some(After::Task(t)), _) => drop(self.tasks.insert(t.id.clone(), (**t).clone())),
            (Some(After::Project(p)), _) => drop(self.projects.insert(p.id.clone(), (**p).clone())),
            (Some(After::Lock(l)), _) => drop(self.locks.insert(lock_key(l), (**l).clone())),
            (None, Some(Before::TaskBefore(t))) => drop(self.tasks.remove(&t.id)),
            (None, Some(Before::ProjectBefore(p))) => drop(self.projects.remove(&p.id)),
            (None, Some(Before::LockBefore(l))) => drop(self.locks.remove(&lock_key(l))),
            _ => panic!("event with no row image: {e:?}"),
        }
        let deleted = matches!(
            e.action(),
            Action::Deleted | Action::Released | Action::Expired
        );
        assert_eq!(
            deleted,
            e.after.is_none(),
            "action {:?} vs after image",
            e.action()
        );
    }

    /// Reads the real tables in the same typed form, independently of walcast.
    pub async fn load(client: &Client) -> Tables {
        let ts = |micros: Option<i64>| {
            micros.map(|m| pbjson_types::Timestamp {
                seconds: m.div_euclid(1_000_000),
                nanos: (m.rem_euclid(1_000_000) * 1000) as i32,
            })
        };
        let us = |col: &str| format!("(extract(epoch from {col}) * 1000000)::bigint");
        let mut t = Tables::default();
        let sql = format!(
            "SELECT id::text, tenant_id, project_id::text, title, description, status, priority, assignee, {}, {}, version, {}, {},
                    updated_by, actor_type, client_id::text, metadata::text FROM tasks",
            us("due_at"), us("completed_at"), us("created_at"), us("updated_at"));
        for r in client.query(&sql, &[]).await.expect("read tasks") {
            let task = Task {
                id: r.get(0),
                tenant_id: r.get(1),
                project_id: r.get(2),
                title: r.get(3),
                description: r.get(4),
                status: r.get(5),
                priority: r.get(6),
                assignee: r.get(7),
                due_at: ts(r.get(8)),
                completed_at: ts(r.get(9)),
                version: r.get(10),
                created_at: ts(r.get(11)),
                updated_at: ts(r.get(12)),
                updated_by: r.get(13),
                actor_type: r.get(14),
                client_id: r.get(15),
                metadata: r.get(16),
            };
            t.tasks.insert(task.id.clone(), task);
        }
        let sql = format!(
            "SELECT id::text, tenant_id, name, description, status, version, {}, {}, updated_by, actor_type, client_id::text, metadata::text FROM projects",
            us("created_at"),
            us("updated_at")
        );
        for r in client.query(&sql, &[]).await.expect("read projects") {
            let p = Project {
                id: r.get(0),
                tenant_id: r.get(1),
                name: r.get(2),
                description: r.get(3),
                status: r.get(4),
                version: r.get(5),
                created_at: ts(r.get(6)),
                updated_at: ts(r.get(7)),
                updated_by: r.get(8),
                actor_type: r.get(9),
                client_id: r.get(10),
                metadata: r.get(11),
            };
            t.projects.insert(p.id.clone(), p);
        }
        let sql = format!(
            "SELECT tenant_id, record_type, record_id::text, locked_by, {}, {} FROM editing_locks",
            us("locked_at"),
            us("expires_at")
        );
        for r in client.query(&sql, &[]).await.expect("read locks") {
            let l = EditingLock {
                tenant_id: r.get(0),
                record_type: r.get(1),
                record_id: r.get(2),
                locked_by: r.get(3),
                locked_at: ts(r.get(4)),
                expires_at: ts(r.get(5)),
            };
            t.locks.insert(lock_key(&l), l);
        }
        t
    }
}
