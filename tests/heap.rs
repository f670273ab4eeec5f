//! `heap_histogram` and `heap_retainers` against a real SBCL whose heap the test arranged:
//! 10,000 structure instances held by a global, CLOS instances, and a thread that makes 5,000
//! more objects of a second type on demand (through a file: read mode has no eval). Object
//! sizes come from the image itself (`sb-ext:primitive-object-size`, written to a file) and
//! from the arithmetic of words.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Image, Setup};
use sbmon::config::Config;
use sbmon::tools::{Class, ToolError};
use sbmon::wire::Sexp;
use serde_json::{Value, json};

const LEAKED: u64 = 10_000;
const WIDGETS: u64 = 250;
const GROWN: u64 = 5_000;

/// The arranged heap: `SBMON-TEST::LEAK-ITEM` (3 slots) ×10,000 in `SBMON-TEST::*LEAKED*`,
/// `SBMON-TEST::WIDGET` (a CLOS class) ×250, and a thread that, when `<dir>/grow` appears,
/// makes 5,000 `SBMON-TEST::GROW-ITEM` (14 slots) into `*GROWN*`. `<dir>/sizes` receives the
/// two structures' sizes as the image measures them.
fn arranged(dir: &Path) -> Vec<String> {
    let file = |name: &str| Sexp::string(dir.join(name).to_string_lossy()).to_string();
    vec![
        "(defstruct (sbmon-test::leak-item (:constructor sbmon-test::make-leak-item)) a b c)".into(),
        "(defstruct (sbmon-test::grow-item (:constructor sbmon-test::make-grow-item)) s0 s1 s2 s3 s4 s5 s6 s7 s8 s9 s10 s11 s12 s13)".into(),
        "(defclass sbmon-test::widget () ((x :initform 1)))".into(),
        format!(
            "(defvar sbmon-test::*leaked* (loop repeat {LEAKED} collect (sbmon-test::make-leak-item)))"
        ),
        format!(
            "(defvar sbmon-test::*widgets* (loop repeat {WIDGETS} collect (make-instance 'sbmon-test::widget)))"
        ),
        "(defvar sbmon-test::*grown* nil)".into(),
        format!(
            "(with-open-file (s {sizes} :direction :output)
               (format s \"~d ~d\" (sb-ext:primitive-object-size (sbmon-test::make-leak-item))
                                  (sb-ext:primitive-object-size (sbmon-test::make-grow-item))))",
            sizes = file("sizes")
        ),
        // The two measured items are garbage, which a heap walk counts until a collection:
        // collect now, so that none is counted as existing before the test grows the heap.
        "(sb-ext:gc :full t)".into(),
        format!(
            "(sb-thread:make-thread
               (lambda ()
                 (loop (when (probe-file {grow})
                         (setf sbmon-test::*grown*
                               (loop repeat {GROWN} collect (sbmon-test::make-grow-item)))
                         (delete-file {grow}))
                       (sleep 0.05)))
               :name \"test-grower\")",
            grow = file("grow")
        ),
    ]
}

struct Arranged {
    image: Image,
    dir: tempfile::TempDir,
}

impl Arranged {
    async fn start() -> Arranged {
        let dir = tempfile::Builder::new()
            .prefix("sbmon-heap-")
            .tempdir()
            .unwrap();
        let image = Image::start(Setup {
            forms: arranged(dir.path()),
            ..Setup::default()
        })
        .await;
        Arranged { image, dir }
    }

    /// (LEAK-ITEM, GROW-ITEM) sizes in bytes, as the image measured them.
    fn sizes(&self) -> (u64, u64) {
        let text = std::fs::read_to_string(self.dir.path().join("sizes")).unwrap();
        let mut it = text.split_whitespace().map(|n| n.parse::<u64>().unwrap());
        (it.next().unwrap(), it.next().unwrap())
    }

    /// Make the image allocate 5,000 GROW-ITEMs, and wait until it has.
    async fn grow(&self) {
        let trigger = self.dir.path().join("grow");
        std::fs::write(&trigger, "").unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while trigger.exists() {
            assert!(Instant::now() < deadline, "the image did not grow");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// An instance of N slots on x86-64: a header word (holding the layout) plus N words,
/// rounded up to an even number of words.
fn instance_bytes(slots: u64) -> u64 {
    (1 + slots).div_ceil(2) * 2 * 8
}

fn row<'a>(h: &'a Value, type_name: &str) -> Option<&'a Value> {
    h["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == type_name)
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

#[tokio::test]
async fn histogram_counts_the_objects_the_image_holds() {
    let a = Arranged::start().await;
    let catalog = a.image.catalog();
    let (leak_size, grow_size) = a.sizes();
    assert_eq!(
        leak_size,
        instance_bytes(3),
        "the image's own size of LEAK-ITEM"
    );
    assert_eq!(grow_size, instance_bytes(14));

    // The first call loads the heap part; the agent answers pings all the while.
    let client = a.image.client();
    let histogram = catalog.call("heap_histogram", json!({"top": 500}));
    let pings = async {
        let mut answered = 0;
        for _ in 0..20 {
            client.ping().await.expect("ping during the walk");
            answered += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        answered
    };
    let (h, answered) = tokio::join!(histogram, pings);
    let h = h.unwrap();
    assert_eq!(answered, 20);

    let leak = row(&h, "SBMON-TEST::LEAK-ITEM").expect("LEAK-ITEM counted under its class");
    let count = u(&leak["count"]);
    assert!((LEAKED..LEAKED + 3).contains(&count), "{leak}");
    assert_eq!(u(&leak["bytes"]), count * leak_size, "{leak}");
    let widget = row(&h, "SBMON-TEST::WIDGET").expect("a CLOS instance counted under its class");
    // the instances the test made, and the class prototype SBCL may have made
    let widgets = u(&widget["count"]);
    assert!((WIDGETS..=WIDGETS + 1).contains(&widgets), "{widget}");
    assert!(
        row(&h, "INSTANCE").is_none(),
        "instances are named by class"
    );
    for builtin in ["CONS", "SIMPLE-VECTOR", "SYMBOL", "CODE"] {
        assert!(row(&h, builtin).is_some(), "{builtin} missing");
    }
    // The list holding the items: 10,000 conses of 16 bytes at least.
    assert!(u(&row(&h, "CONS").unwrap()["count"]) >= LEAKED);

    // Totals agree with the rows and with the heap.
    let rows = h["rows"].as_array().unwrap();
    let types = u(&h["types"]);
    assert_eq!(types, rows.len() as u64 + u(&h["types_omitted"]));
    let (sum_count, sum_bytes) = rows
        .iter()
        .fold((0, 0), |(c, b), r| (c + u(&r["count"]), b + u(&r["bytes"])));
    if u(&h["types_omitted"]) == 0 {
        assert_eq!(sum_count, u(&h["objects"]));
        assert_eq!(sum_bytes, u(&h["bytes"]));
    }
    let heap_used = u(&h["heap_used_bytes"]);
    let walked = u(&h["bytes"]);
    assert!(
        walked <= heap_used + (4 << 20) && walked > heap_used / 2,
        "walked {walked} of {heap_used}"
    );
    assert_eq!(h["truncated"], false);
    assert!(h["walk_seconds"].as_f64().unwrap() > 0.0);
    assert!(h["snapshot_id"].as_u64().is_some());

    // top: the largest first, the rest counted as omitted.
    let top5 = catalog
        .call("heap_histogram", json!({"top": 5}))
        .await
        .unwrap();
    let rows = top5["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 5);
    assert!(
        rows.windows(2)
            .all(|w| u(&w[0]["bytes"]) >= u(&w[1]["bytes"]))
    );
    assert_eq!(u(&top5["types_omitted"]), u(&top5["types"]) - 5);

    // generation: the items' counts over generations 0..6 add up to the whole (the image is
    // idle and the calls allocate far less than a nursery: nothing moves between them).
    let mut by_generation = 0;
    for g in 0..=6 {
        let h = catalog
            .call("heap_histogram", json!({"generation": g, "top": 500}))
            .await
            .unwrap();
        assert_eq!(h["generation"], g);
        by_generation += row(&h, "SBMON-TEST::LEAK-ITEM").map_or(0, |r| u(&r["count"]));
    }
    assert_eq!(by_generation, count);
}

#[tokio::test]
async fn since_puts_the_growing_type_first_and_retainers_name_the_global() {
    let a = Arranged::start().await;
    let catalog = a.image.catalog();
    let (_, grow_size) = a.sizes();
    let first = catalog
        .call("heap_histogram", json!({"top": 3}))
        .await
        .unwrap();
    let id = first["snapshot_id"].as_u64().unwrap();
    a.grow().await;
    let diff = catalog
        .call("heap_histogram", json!({"since": id, "top": 10}))
        .await
        .unwrap();
    assert_eq!(diff["since"], id);
    assert!(u(&diff["snapshot_id"]) > id);
    let top = &diff["rows"][0];
    assert_eq!(top["type"], "SBMON-TEST::GROW-ITEM", "{diff}");
    // All of them, but for those still in the grower's open allocation region, which the
    // walk cannot see until the region closes (README, "What fills the heap"): a region is a
    // few GC pages (32 KiB each), some hundreds of these 128-byte objects at most.
    let grown = u(&top["count"]);
    assert!(
        (GROWN * 9 / 10..=GROWN).contains(&grown),
        "{grown} of {GROWN} counted"
    );
    assert_eq!(top["count_delta"], grown, "none existed before");
    assert_eq!(u(&top["bytes_delta"]), grown * grow_size);
    assert!(diff["bytes_delta"].as_i64().unwrap() >= (grown * grow_size) as i64 / 2);

    let r = catalog
        .call(
            "heap_retainers",
            json!({"type": "SBMON-TEST::LEAK-ITEM", "max_paths": 2}),
        )
        .await
        .unwrap();
    assert_eq!(r["sampled"], 2, "{r}");
    let paths = r["paths"].as_array().unwrap();
    assert_eq!(paths.len(), 2, "every sampled object is traced: {r}");
    for p in paths {
        assert_eq!(p["target"], "SBMON-TEST::LEAK-ITEM");
        assert_eq!(p["global"], "SBMON-TEST::*LEAKED*", "{p}");
        let steps = p["steps"].as_array().unwrap();
        let symbol = steps
            .iter()
            .find(|s| s["symbol"] == "SBMON-TEST::*LEAKED*")
            .expect("the global is a step of the path");
        assert_eq!(symbol["via"], "value");
        // the object is an element of the list the global holds
        assert_eq!(steps.last().unwrap()["type"], "CONS");
        assert_eq!(steps.last().unwrap()["via"], "car");
    }
    assert!(r["search_seconds"].as_f64().unwrap() > 0.0);

    // Young objects just made, after walks that visited them: the path still starts at
    // the global, not at a stale word on a stack of the agent's.
    for _ in 0..3 {
        let r = catalog
            .call(
                "heap_retainers",
                json!({"type": "SBMON-TEST::GROW-ITEM", "max_paths": 3}),
            )
            .await
            .unwrap();
        let paths = r["paths"].as_array().unwrap();
        assert_eq!(paths.len(), 3, "{r}");
        for p in paths {
            assert_eq!(p["global"], "SBMON-TEST::*GROWN*", "{p}");
        }
    }

    // A type with no live object: an answer that says so, not an error.
    let none = catalog
        .call(
            "heap_retainers",
            json!({"type": "SB-THREAD:MUTEX", "max_paths": 1}),
        )
        .await
        .unwrap();
    assert!(u(&none["sampled"]) <= 1, "{none}");

    // Snapshots are bounded: after four more, the first is gone, and says so.
    for _ in 0..4 {
        catalog
            .call("heap_histogram", json!({"top": 1}))
            .await
            .unwrap();
    }
    let gone = catalog
        .call("heap_histogram", json!({"since": id}))
        .await
        .unwrap_err();
    assert!(gone.is_usage(), "{gone}");
    let text = gone.to_string();
    assert!(
        text.contains(&format!("no heap snapshot {id}")) && text.contains("keeps the last 4"),
        "{text}"
    );
    // The agent still answers after the walks.
    a.image.client().ping().await.unwrap();
}

#[tokio::test]
async fn bad_arguments_and_the_heap_limit_are_clear_errors() {
    let image = Image::start(Setup::default()).await;
    let catalog = image.catalog();
    let usage = [
        ("heap_histogram", json!({"top": 0}), "top must be in 1..500"),
        (
            "heap_histogram",
            json!({"top": 501}),
            "top must be in 1..500",
        ),
        ("heap_histogram", json!({"top": "ten"}), "invalid type"),
        (
            "heap_histogram",
            json!({"since": 987654}),
            "no heap snapshot 987654",
        ),
        ("heap_histogram", json!({"since": "x"}), "invalid type"),
        (
            "heap_histogram",
            json!({"generation": 7}),
            "generation must be in 0..6",
        ),
        (
            "heap_histogram",
            json!({"max_seconds": 0}),
            "max_seconds must be in 0.1..60",
        ),
        ("heap_histogram", json!({"topp": 3}), "unknown field"),
        ("heap_retainers", json!({}), "missing field `type`"),
        ("heap_retainers", json!({"type": 5}), "invalid type"),
        (
            "heap_retainers",
            json!({"type": ""}),
            "type must not be empty",
        ),
        (
            "heap_retainers",
            json!({"type": "NO-SUCH-PACKAGE::THING"}),
            "unknown type \"NO-SUCH-PACKAGE::THING\"",
        ),
        ("heap_retainers", json!({"type": "INTEGER"}), "unknown type"),
        (
            "heap_retainers",
            json!({"type": "CONS", "max_paths": 11}),
            "max_paths must be in 1..10",
        ),
        (
            "heap_retainers",
            json!({"type": "CONS", "max_depth": 0}),
            "max_depth must be in 1..200",
        ),
    ];
    for (tool, args, expected) in usage {
        let e = catalog.call(tool, args.clone()).await.unwrap_err();
        assert!(e.is_usage(), "{tool} {args}: {e}");
        let text = e.to_string();
        assert!(text.contains(expected), "{tool} {args}: {text}");
    }

    // A heap over the configured limit is refused, with how to raise it.
    let mut config = Config::default();
    config.heap.max_walk_heap_bytes = 1 << 20;
    let small = image.catalog_with(config);
    for (tool, args) in [
        ("heap_histogram", json!({})),
        ("heap_retainers", json!({"type": "CONS"})),
    ] {
        let e = small.call(tool, args).await.unwrap_err();
        let text = e.to_string();
        assert!(!e.is_usage(), "{text}");
        assert!(matches!(e, ToolError::Agent(_)), "{text}");
        assert!(
            text.contains("REFUSED")
                && text.contains("exceeds the walk limit of 1.0 MiB")
                && text.contains("max_walk_heap_bytes"),
            "{text}"
        );
    }

    // Both are read tools: a read-only catalog lists them.
    let listed: Vec<_> = catalog
        .tools()
        .filter(|t| t.name.starts_with("heap_"))
        .map(|t| (t.name, t.class))
        .collect();
    assert_eq!(
        listed,
        [
            ("heap_histogram", Class::Read),
            ("heap_retainers", Class::Read)
        ]
    );
    image.client().ping().await.unwrap();
}

#[tokio::test]
async fn a_missing_heap_part_is_named_in_the_error() {
    // The image removes the part the launcher wrote beside the agent before it is used.
    let image = Image::start(Setup {
        forms: vec![
            "(delete-file (merge-pathnames \"sbmon-agent-heap.lisp\" sbmon-agent::*agent-directory*))"
                .into(),
        ],
        ..Setup::default()
    })
    .await;
    let e = image
        .catalog()
        .call("heap_histogram", json!({}))
        .await
        .unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("UNAVAILABLE")
            && text.contains("sbmon-agent-heap.lisp")
            && text.contains("missing"),
        "{text}"
    );
    assert!(!e.is_usage());
    // the rest of the agent is unaffected
    image
        .catalog()
        .call("memory_stats", json!({}))
        .await
        .unwrap();
}
