//! Events against a real API server: one Event per distinct message on an object, a repeat
//! counted on it, a repeat of an Event since deleted a new one.

use anyhow::{Context, Result, ensure};
use catalog_bridge::model::Reason;
use catalog_bridge::status::events::{Announcer, warning};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event;
use kube::Resource;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use localenv::Env;
use serde_json::json;

/// The Events about `name` in `default`, by note.
async fn events_about(client: &kube::Client, name: &str) -> Result<Vec<Event>> {
    let api: Api<Event> = Api::namespaced(client.clone(), "default");
    let list = api.list(&ListParams::default()).await?;
    Ok(list
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect())
}

#[tokio::test]
async fn each_distinct_message_is_one_event_and_a_repeat_is_counted_on_it() -> Result<()> {
    let env = Env::builder().kube().start().await?;
    let client = env.kube()?.client().await?;
    let maps: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let object = maps
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": "about"}}))?,
        )
        .await?;
    let reference = object.object_ref(&());
    let mut announcer = Announcer::new(client.clone());

    let first = warning(Reason::Refused, "entry a refused", "Write");
    let second = warning(Reason::Refused, "entry b refused", "Write");
    announcer.publish(&first, &reference).await;
    announcer.publish(&second, &reference).await;
    announcer.publish(&first, &reference).await;
    announcer.publish(&first, &reference).await;

    let events = events_about(&client, "about").await?;
    ensure!(
        events.len() == 2,
        "two distinct notes, two Events: {events:#?}"
    );
    let note = |n: &str| {
        events
            .iter()
            .find(|e| e.note.as_deref() == Some(n))
            .with_context(|| format!("an Event with the note {n:?}: {events:#?}"))
    };
    let a = note("entry a refused")?;
    ensure!(
        a.series.as_ref().map(|s| s.count) == Some(3),
        "the note published three times is one Event counted 3 times: {a:#?}"
    );
    ensure!(a.type_.as_deref() == Some("Warning") && a.reason.as_deref() == Some("Refused"));
    ensure!(a.reporting_controller.as_deref() == Some("catalog-bridge"));
    let b = note("entry b refused")?;
    ensure!(b.series.is_none(), "published once, no series: {b:#?}");

    // An Event gone (expired, deleted): the next repeat is a new Event.
    let api: Api<Event> = Api::namespaced(client.clone(), "default");
    let gone = a.metadata.name.clone().context("the Event's name")?;
    api.delete(&gone, &DeleteParams::default()).await?;
    announcer.publish(&first, &reference).await;
    let events = events_about(&client, "about").await?;
    let again: Vec<&Event> = (events.iter())
        .filter(|e| e.note.as_deref() == Some("entry a refused"))
        .collect();
    ensure!(
        again.len() == 1
            && again[0].series.is_none()
            && again[0].metadata.name.as_deref() != Some(gone.as_str()),
        "a new Event for the repeat of a deleted one: {again:#?}"
    );
    Ok(())
}
