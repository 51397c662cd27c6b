//! `make demo` runs here as it runs for a user: the scenario of `examples/demo`, on the real API
//! server, kube-controller-manager and catalogs, with the controller binary. Every answer it
//! prints is checked, the block the README shows is what it prints, and every command it tells
//! the user to explore with is run in a shell exactly as printed.

#[path = "../examples/demo/scenario.rs"]
mod scenario;
mod support;

use std::process::Command;

use anyhow::{Context, Result, bail, ensure};

const README: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/README.md");

/// A line's words, with durations and ages (`59ms`, `0s`, `1m2s`) made equal, so that a
/// transcript compares with the README whatever the timing.
fn timeless(line: &str) -> Vec<String> {
    line.split_whitespace()
        .map(|w| {
            let digits = w.trim_end_matches(|c: char| c.is_ascii_alphabetic() || c == 'µ');
            let is_duration = !digits.is_empty()
                && digits.len() < w.len()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == 'µ' || c == '.')
                && w.starts_with(|c: char| c.is_ascii_digit());
            if is_duration {
                "<time>".to_string()
            } else {
                w.to_string()
            }
        })
        .collect()
}

/// The demo output the README shows: the fenced block after `make demo`'s description, up to
/// the "Explore it" line (the rest of the block depends on the machine).
fn readme_answers() -> Result<Vec<String>> {
    let text = std::fs::read_to_string(README).context("reading README.md")?;
    let start = text
        .find("\nConsul answers:")
        .context("README shows no `Consul answers:` line")?;
    let end = text[start..]
        .find("\nExplore it")
        .context("README's demo block has no `Explore it` line")?;
    Ok(text[start + 1..start + end]
        .lines()
        .map(str::to_string)
        .collect())
}

/// What each explore command must answer, by how the command ends. A command printed without
/// an entry here fails the test, so that nothing the demo prints goes unchecked.
const EXPECTED: &[(&str, &[&str])] = &[
    ("query consul api_x", &["api_x @ 10.0.0.1:8080"]),
    (
        "query etcd memcache",
        &["memcache @ 10.4.0.1:8080 & 10.4.0.2:8080"],
    ),
    ("query zk mysql_x", &["mysql_x @ 10.8.0.8:3306"]),
    ("kubectl get xcat", &["consul", "etcd", "zk", "True"]),
    ("kubectl get xreg -A", &["shop", "mysql-x", "Import"]),
    (
        "kubectl get endpointslices -n shop",
        &["api-x", "memcache", "mysql-x", "10.8.0.8"],
    ),
    ("api_x?passing'", &["\"10.0.0.1\"", "api_x"]),
    (
        "etcdctl get --prefix /services/",
        &["/services/memcache/providers/10.4.0.1:8080"],
    ),
];

#[tokio::test(flavor = "multi_thread")]
async fn make_demo_prints_each_catalogs_answer_and_every_command_it_shows_works() -> Result<()> {
    let demo = scenario::run().await?;
    let t = &demo.transcript;
    let log = || demo.cb.log();

    // The answers, as discovery clients of each catalog get them.
    for line in [
        "Consul answers:  api_x @ 10.0.0.1:8080 & 10.0.0.2:8080",
        "etcd answers:    memcache @ 10.4.0.1:8080 & 10.4.0.2:8080",
        "ZooKeeper answers: mysql_x @ 10.8.0.8:3306",
    ] {
        ensure!(
            t.iter().any(|l| l == line),
            "the demo did not print {line:?}:\n{}\n{}",
            t.join("\n"),
            log()
        );
    }
    let slice = t
        .iter()
        .skip_while(|l| !l.starts_with("Service shop/mysql-x"))
        .nth(2)
        .context("no EndpointSlice printed")?;
    ensure!(
        slice.starts_with("mysql-x-")
            && timeless(slice).get(1..4)
                == Some(&["IPv4", "3306", "10.8.0.8"].map(String::from)[..]),
        "the imported slice reads {slice:?}"
    );
    let after = t
        .iter()
        .find(|l| l.contains("after the Pod turned unready"))
        .context("no answer after the Pod turned unready")?;
    ensure!(
        after.starts_with("Consul answers:  api_x @ 10.0.0.1:8080   (updated "),
        "after the Pod turned unready, Consul answers {after:?}"
    );

    // The README shows exactly this, up to timings.
    let shown = readme_answers()?;
    let printed: Vec<&String> = t
        .iter()
        .skip_while(|l| !l.starts_with("Consul answers:"))
        .take(shown.len())
        .collect();
    for (i, line) in shown.iter().enumerate() {
        let got = printed.get(i).map(|l| l.as_str()).unwrap_or("<nothing>");
        ensure!(
            timeless(line) == timeless(got),
            "README line {line:?} is not what the demo prints ({got:?})"
        );
    }

    // Every command printed under "Explore it", run as printed in a shell set up by the lines
    // printed before them.
    let setup = demo.explore.setup.join("\n");
    for (command, _) in &demo.explore.commands {
        let (_, wanted) = EXPECTED
            .iter()
            .find(|(end, _)| command.ends_with(end))
            .with_context(|| format!("the demo prints {command:?}, which no check covers"))?;
        let out = localenv::run_tool(
            Command::new("bash")
                .arg("-c")
                .arg(format!("shopt -s expand_aliases\n{setup}\n{command}\n")),
        )
        .with_context(|| format!("running {command:?} as the demo prints it"))?;
        for w in *wanted {
            if !out.contains(w) {
                bail!("{command:?} printed no {w:?}:\n{out}");
            }
        }
    }
    let http = reqwest::Client::new();
    for (what, address) in &demo.explore.addresses {
        let status = http
            .get(address)
            .send()
            .await
            .with_context(|| format!("{what} {address}"))?
            .status();
        ensure!(status.is_success(), "{what} {address} answers {status}");
    }

    // Every metric the README and the docs name is one the controller serves, once there is
    // something to count: an export to a catalog that does not exist.
    localenv::run_tool(Command::new("bash").arg("-c").arg(format!(
        "shopt -s expand_aliases\n{setup}\n\
         kubectl annotate service -n shop memcache catalog-bridge.io/export=etcd,nowhere --overwrite\n"
    )))?;
    let (_, metrics) = demo
        .explore
        .addresses
        .iter()
        .find(|(what, _)| what.starts_with("metrics"))
        .context("the demo prints no metrics address")?;
    let served = localenv::eventually(
        "the invalid export to be counted",
        std::time::Duration::from_secs(30),
        || async {
            let text = http.get(metrics).send().await?.text().await?;
            Ok(text
                .contains("catalog_bridge_invalid_exports{")
                .then_some(text))
        },
    )
    .await?;
    let root = env!("CARGO_MANIFEST_DIR");
    let mut named = std::collections::BTreeSet::new();
    for doc in ["README.md", "docs/architecture.md", "docs/operations.md"] {
        let text = std::fs::read_to_string(format!("{root}/{doc}"))
            .with_context(|| format!("reading {doc}"))?;
        for (i, _) in text.match_indices("catalog_bridge_") {
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            named.insert((doc, name));
        }
    }
    ensure!(named.len() >= 9, "the docs name the metrics: {named:?}");
    for (doc, name) in named {
        // A counter's family is served as `x` (`# TYPE x counter`), its samples as `x_total`; a
        // histogram's samples as `x_bucket`.
        let family = name.trim_end_matches("_total").trim_end_matches("_bucket");
        ensure!(
            served.contains(&format!("# TYPE {family} ")),
            "{doc} names {name}, which /metrics does not serve:\n{served}"
        );
    }
    Ok(())
}
