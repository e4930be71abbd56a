//! `kpipe fetch kits19` against a local HTTP server (127.0.0.1 only) that serves phantom
//! cases in the official layouts, with a dropped connection, a 404, a truncated file, a
//! non-NIfTI body, a server that always drops, and a host that does not answer.
//! `kpipe synth --kits19-size` is here too: the data the scale benchmark fetches-like.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{self, Project};

/// How the server answers one path.
#[derive(Clone)]
enum Route {
    /// The bytes, honouring `Range: bytes=N-`.
    Serve(Vec<u8>),
    /// The first request gets the full `Content-Length` but only half the bytes before
    /// the connection closes; later ones are served (with `Range`).
    DropOnce(Vec<u8>),
    /// Every request gets half the bytes under the full length, `Range` ignored.
    AlwaysDrop(Vec<u8>),
}

/// A request the server saw: its path and its `Range` header.
type Seen = (String, Option<String>);

struct Server {
    addr: SocketAddr,
    routes: Arc<Mutex<HashMap<String, Route>>>,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    /// Serves `routes` on 127.0.0.1 until dropped (or two minutes, whichever is first).
    fn start(routes: HashMap<String, Route>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let routes = Arc::new(Mutex::new(routes));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s, st) = (routes.clone(), seen.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            let mut served = HashMap::<String, usize>::new();
            while !st.load(Ordering::Relaxed) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let _ = handle(stream, &r, &s, &mut served);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Server {
            addr,
            routes,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self, root: &str) -> String {
        format!("http://{}/{root}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn requests_for(&self, path: &str) -> Vec<Option<String>> {
        self.seen()
            .into_iter()
            .filter(|(p, _)| p == path)
            .map(|(_, r)| r)
            .collect()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Answers one request on `stream` and closes it.
fn handle(
    mut stream: TcpStream,
    routes: &Mutex<HashMap<String, Route>>,
    seen: &Mutex<Vec<Seen>>,
    served: &mut HashMap<String, usize>,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 16 * 1024 {
        if stream.read(&mut byte)? == 0 {
            return Ok(());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
    let range = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("range")
            .then(|| v.trim().to_string())
    });
    seen.lock().unwrap().push((path.clone(), range.clone()));
    let nth = {
        let n = served.entry(path.clone()).or_default();
        *n += 1;
        *n
    };
    let route = routes.lock().unwrap().get(&path).cloned();
    let from = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok());
    let (body, honour_range, cut) = match &route {
        None => {
            let text = b"not found";
            write!(
                stream,
                "HTTP/1.1 404 Not Found\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                text.len()
            )?;
            return stream.write_all(text);
        }
        Some(Route::Serve(b)) => (b, true, false),
        Some(Route::DropOnce(b)) => (b, true, nth == 1),
        Some(Route::AlwaysDrop(b)) => (b, false, true),
    };
    match from.filter(|_| honour_range) {
        Some(start) if start >= body.len() => write!(
            stream,
            "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            body.len()
        ),
        Some(start) => {
            write!(
                stream,
                "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {start}-{}/{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len() - 1,
                body.len(),
                body.len() - start
            )?;
            stream.write_all(&body[start..])
        }
        None => {
            write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )?;
            if cut {
                stream.write_all(&body[..body.len() / 2])?;
                stream.flush()?;
                stream.shutdown(std::net::Shutdown::Both)
            } else {
                stream.write_all(body)
            }
        }
    }
}

/// `n` phantom cases in a KiTS19 folder `src` under the project, and the routes that
/// serve its files at the paths of the official layouts (for a test to break some of,
/// then [`Server::start`]).
fn phantom_source(p: &Project, n: usize) -> (PathBuf, HashMap<String, Route>) {
    let (code, _, err) = p.run(&[
        "synth",
        "--out",
        "src",
        "--cases",
        &n.to_string(),
        "--shape",
        "16,32,32",
        "--seed",
        "3",
    ]);
    assert_eq!(code, 0, "{err}");
    let src = p.path().join("src");
    let routes = official_routes(&src, n);
    (src, routes)
}

fn imaging_path(case: usize) -> String {
    format!("/img/images/case_{case:05}.nii.gz")
}

fn segmentation_path(case: usize) -> String {
    format!("/seg/data/case_{case:05}/segmentation.nii.gz")
}

/// Every file of `src` at the paths of the official layouts.
fn official_routes(src: &Path, n: usize) -> HashMap<String, Route> {
    let mut routes = HashMap::new();
    let read = |p: PathBuf| std::fs::read(p).unwrap();
    for c in 0..n {
        let dir = src.join(format!("case_{c:05}"));
        routes.insert(
            imaging_path(c),
            Route::Serve(read(dir.join("imaging.nii.gz"))),
        );
        routes.insert(
            segmentation_path(c),
            Route::Serve(read(dir.join("segmentation.nii.gz"))),
        );
    }
    routes.insert(
        "/seg/data/kits.json".into(),
        Route::Serve(read(src.join("kits.json"))),
    );
    routes
}

fn bytes_of(route: &Route) -> Vec<u8> {
    match route {
        Route::Serve(b) | Route::DropOnce(b) | Route::AlwaysDrop(b) => b.clone(),
    }
}

/// `kpipe fetch kits19 --out out` from `server`, 3 at a time; (code, stdout, stderr).
fn fetch(p: &Project, server: &Server, cases: &str, extra: &[&str]) -> (i32, String, String) {
    let (img, seg) = (server.url("img"), server.url("seg"));
    let mut args = vec!["-j", "3"];
    args.extend_from_slice(extra);
    fetch_from(p, &img, &seg, cases, &args)
}

/// `kpipe fetch kits19 --out out` from the URLs `img` and `seg`, with quick retries, no
/// proxy and a two-minute limit; (code, stdout, stderr).
fn fetch_from(
    p: &Project,
    img: &str,
    seg: &str,
    cases: &str,
    extra: &[&str],
) -> (i32, String, String) {
    let mut args = vec![
        "fetch",
        "kits19",
        "--out",
        "out",
        "--cases",
        cases,
        "--imaging-url",
        img,
        "--segmentation-url",
        seg,
        "--retry-wait",
        "0.01",
    ];
    args.extend_from_slice(extra);
    let out = p
        .kpipe(&args)
        .env_remove("HTTP_PROXY")
        .env_remove("http_proxy")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy")
        .timeout(Duration::from_secs(120))
        .output()
        .unwrap();
    common::outcome(out)
}

/// The `case_XXXXX` folders of `dir`, sorted.
fn case_folders(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("case_"))
        .collect();
    v.sort();
    v
}

/// Files under `dir` whose name ends in `.part`.
fn part_files(dir: &Path) -> Vec<PathBuf> {
    walk(dir)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".part"))
        .collect()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

fn kits_ids(path: &Path) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| r["case_id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn fetch_resumes_a_dropped_download_and_a_rerun_skips_every_case() {
    let p = Project::new();
    let (src, mut routes) = phantom_source(&p, 3);
    let dropped = imaging_path(1);
    let body = bytes_of(&routes[&dropped]);
    routes.insert(dropped.clone(), Route::DropOnce(body.clone()));
    let server = Server::start(routes);

    let (code, out, err) = fetch(&p, &server, "0-2", &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("3 cases: 3 fetched, 0 skipped (already there and valid), 0 failed"),
        "{out}"
    );
    let root = p.path().join("out");
    for c in 0..3 {
        for f in ["imaging.nii.gz", "segmentation.nii.gz"] {
            let id = format!("case_{c:05}");
            assert_eq!(
                std::fs::read(root.join(&id).join(f)).unwrap(),
                std::fs::read(src.join(&id).join(f)).unwrap(),
                "{id}/{f}"
            );
        }
    }
    // The dropped file was resumed where it broke, not downloaded again.
    assert_eq!(
        server.requests_for(&dropped),
        [None, Some(format!("bytes={}-", body.len() / 2))]
    );
    assert!(err.contains("retry  case_00001/imaging.nii.gz"), "{err}");
    assert!(err.contains("resume  case_00001/imaging.nii.gz"), "{err}");
    // Every case is present, so `kits.json` is the official file, byte for byte.
    assert_eq!(
        std::fs::read(root.join("kits.json")).unwrap(),
        std::fs::read(src.join("kits.json")).unwrap()
    );
    assert!(part_files(&root).is_empty(), "{:?}", part_files(&root));

    let before = server.seen().len();
    let (code, out, err) = fetch(&p, &server, "0-2", &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("3 cases: 0 fetched, 3 skipped (already there and valid), 0 failed"),
        "{out}"
    );
    assert_eq!(server.seen().len(), before, "a rerun requests nothing");

    // The load stage reads the folder as it is.
    p.write(
        "load.toml",
        "[pipeline]\nname = \"load\"\nseed = 1\n\n[stages.load]\nkind = \"load\"\nsource = \"kits19\"\npath = \"out\"\n",
    );
    let (code, _, err) = p.run(&["run", "load.toml"]);
    assert_eq!(code, 0, "{err}");
    let table = kpipe::data::kits::CaseTable::read(&p.output_with("cases.json")).unwrap();
    let ids: Vec<&str> = table.cases.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(ids, ["case_00000", "case_00001", "case_00002"]);
    assert!(table.cases.iter().all(|c| c.shape == [16, 32, 32]));
}

#[test]
fn bad_cases_are_reported_and_left_absent_while_the_others_complete() {
    let p = Project::new();
    let (src, good) = phantom_source(&p, 6);
    let mut routes = good.clone();
    // case 1: its segmentation is missing (404)
    routes.remove(&segmentation_path(1));
    // case 2: a truncated upload, served whole
    let img2 = bytes_of(&good[&imaging_path(2)]);
    routes.insert(
        imaging_path(2),
        Route::Serve(img2[..img2.len() * 3 / 5].to_vec()),
    );
    // case 3: an HTML page instead of the volume
    routes.insert(
        imaging_path(3),
        Route::Serve(b"<!DOCTYPE html><html><body>Sign in</body></html>".to_vec()),
    );
    // case 5: a connection that always breaks half way, and no Range support
    routes.insert(
        imaging_path(5),
        Route::AlwaysDrop(bytes_of(&good[&imaging_path(5)])),
    );
    let server = Server::start(routes);

    let (code, out, err) = fetch(&p, &server, "0-5", &["--retries", "2"]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        out.contains("6 cases: 2 fetched, 0 skipped (already there and valid), 4 failed"),
        "{out}"
    );
    let line = |id: &str| {
        out.lines()
            .find(|l| l.starts_with(&format!("failed  {id}")))
            .unwrap_or_else(|| panic!("no line for {id}: {out}"))
            .to_string()
    };
    assert!(
        line("case_00001").contains("segmentation: HTTP 404"),
        "{out}"
    );
    assert!(
        line("case_00002").contains("imaging: ") && line("case_00002").contains("truncated"),
        "{out}"
    );
    assert!(line("case_00003").contains("not a NIfTI-1 file"), "{out}");
    assert!(
        line("case_00005").contains("after 3 failed attempts"),
        "{out}"
    );
    // The always-dropping server was asked three times: it ignored the resumes and
    // never got further than half, so each attempt counted against the budget.
    let half = format!("bytes={}-", bytes_of(&good[&imaging_path(5)]).len() / 2);
    assert_eq!(
        server.requests_for(&imaging_path(5)),
        [None, Some(half.clone()), Some(half.clone())]
    );

    let root = p.path().join("out");
    assert_eq!(case_folders(&root), ["case_00000", "case_00004"]);
    assert_eq!(
        kits_ids(&root.join("kits.json")),
        ["case_00000", "case_00004"]
    );
    assert!(out.contains("lists the 2 cases present"), "{out}");
    // Bodies that are not the file are not kept to be resumed; a broken download is.
    let parts = part_files(&root);
    assert_eq!(parts.len(), 1, "{parts:?}");
    assert!(
        parts[0].ends_with("case_00005/imaging.nii.gz.part"),
        "{parts:?}"
    );

    // The server mended: a rerun completes, and fetches only what is missing (the valid
    // files of the failed cases waited in the staging folder).
    *server.routes.lock().unwrap() = good;
    let before = server.seen().len();
    let (code, out, err) = fetch(&p, &server, "0-5", &[]);
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(
        out.contains("6 cases: 4 fetched, 2 skipped (already there and valid), 0 failed"),
        "{out}"
    );
    let mut asked: Vec<String> = server.seen()[before..]
        .iter()
        .map(|s| s.0.clone())
        .collect();
    asked.sort();
    let mut expected = vec![
        segmentation_path(1),
        imaging_path(2),
        imaging_path(3),
        imaging_path(5),
    ];
    expected.sort();
    assert_eq!(asked, expected);
    // The broken download of case 5 was resumed where it stopped.
    assert_eq!(server.requests_for(&imaging_path(5))[3], Some(half));
    assert_eq!(case_folders(&root).len(), 6);
    assert_eq!(
        std::fs::read(root.join("kits.json")).unwrap(),
        std::fs::read(src.join("kits.json")).unwrap()
    );
}

#[test]
fn an_unreachable_host_fails_every_case_and_writes_nothing() {
    let p = Project::new();
    // A port nobody listens on: bound, then released.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let (code, out, err) = fetch_from(&p, &url, &url, "4-5", &["--retries", "1"]);
    assert_eq!(code, 1, "{out}\n{err}");
    assert!(
        out.contains("2 cases: 0 fetched, 0 skipped (already there and valid), 2 failed"),
        "{out}"
    );
    assert!(
        out.contains("failed  case_00004  segmentation: gave up on"),
        "{out}"
    );
    assert!(out.contains("failed  kits.json"), "{out}");
    assert!(err.contains("retry  "), "{err}");
    let root = p.path().join("out");
    assert!(case_folders(&root).is_empty());
    assert!(!root.join("kits.json").exists());
}

#[test]
fn bad_fetch_arguments_are_usage_errors() {
    let p = Project::new();
    for args in [
        ["--cases", "9-3", "--imaging-url", "http://127.0.0.1:9"],
        ["--cases", "1", "--imaging-url", "ftp://example.org"],
        ["--cases", "1", "--retry-wait", "-1"],
    ] {
        let mut full = vec!["fetch", "kits19", "--out", "out"];
        full.extend_from_slice(&args);
        let (code, _, err) = p.run(&full);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("error"), "{err}");
    }
    assert!(!p.path().join("out/case_00001").exists());
}

#[test]
fn synth_kits19_size_writes_512_square_cases_with_their_own_slice_counts() {
    // The seed whose first case has the fewest slices keeps the test quick.
    let seed = (0..64u64)
        .min_by_key(|&s| kpipe::data::phantom::kits19_slices(s, 0))
        .unwrap();
    let slices = kpipe::data::phantom::kits19_slices(seed, 0);
    let p = Project::new();
    let (code, out, err) = p.run(&[
        "synth",
        "--out",
        "big",
        "--cases",
        "1",
        "--kits19-size",
        "--seed",
        &seed.to_string(),
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("wrote 1 cases"), "{out}");
    let (code, out, _) = p.run(&["inspect", "big/case_00000/segmentation.nii.gz", "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["shape"], serde_json::json!([slices, 512, 512]));
    // Over KiTS19's 210 cases the counts spread like the real ones: 29 to 1059 slices,
    // about 216 on average, a few hundred for some.
    let counts: Vec<usize> = (0..210)
        .map(|c| kpipe::data::phantom::kits19_slices(0, c))
        .collect();
    let mean = counts.iter().sum::<usize>() as f64 / 210.0;
    assert!(counts.iter().all(|n| (29..=1059).contains(n)), "{counts:?}");
    assert!((180.0..260.0).contains(&mean), "mean {mean}");
    assert!(
        counts.iter().filter(|&&n| n >= 400).count() >= 10,
        "{counts:?}"
    );
    assert!(
        counts.iter().filter(|&&n| n <= 100).count() >= 20,
        "{counts:?}"
    );
    let (code, _, err) = p.run(&[
        "synth",
        "--out",
        "x",
        "--kits19-size",
        "--shape",
        "16,32,32",
    ]);
    assert_eq!(code, 2, "--kits19-size replaces --shape: {err}");
}
