//! What one export asks for: read from a Service's annotations or an Export registration,
//! with what is wrong with it.

use std::collections::BTreeMap;

use crate::k8s::cached::CachedService;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::Source;
use crate::api::crd::{
    Direction, ExternalRegistration, MAX_META, MAX_META_VALUE_LENGTH, MAX_TAG_LENGTH, MAX_TAGS,
    PortRef,
};
use crate::api::labels::{
    ANNOTATION_EXPORT, ANNOTATION_META_PREFIX, ANNOTATION_NAME, ANNOTATION_PORT, ANNOTATION_TAGS,
};
use crate::model::{Problem, Reason};

/// What one export asks for, once its source is parsed.
#[derive(Clone)]
pub(super) struct Request {
    pub(super) source: Source,
    pub(super) namespace: String,
    pub(super) service: String,
    pub(super) catalogs: Vec<String>,
    pub(super) external_name: Option<String>,
    pub(super) port: Option<PortRef>,
    pub(super) tags: Vec<String>,
    pub(super) meta: BTreeMap<String, String>,
    /// A problem found while parsing the source (bad annotation).
    pub(super) problem: Option<Problem>,
    /// When the source (Service or registration) was created: the oldest export keeps a
    /// name that several namespaces export.
    pub(super) created: Option<Time>,
}

pub(super) fn request_from_annotations(svc: &CachedService) -> Option<Request> {
    let annotations = svc.metadata.annotations.as_ref()?;
    let export = annotations.get(ANNOTATION_EXPORT)?;
    let namespace = svc.metadata.namespace.clone()?;
    let service = svc.metadata.name.clone()?;
    // A catalog named twice is exported to once.
    let mut catalogs: Vec<String> = Vec::new();
    for c in split_list(export) {
        if !catalogs.contains(&c) {
            catalogs.push(c);
        }
    }
    let mut problem = None;
    if catalogs.is_empty() {
        problem = Some(Problem {
            reason: Reason::InvalidAnnotation,
            message: format!("{ANNOTATION_EXPORT} names no ExternalCatalog"),
        });
    }
    let port = annotations.get(ANNOTATION_PORT).map(|p| parse_port_ref(p));
    let external_name = annotations
        .get(ANNOTATION_NAME)
        .map(|n| n.trim().to_string());
    if let Some(n) = &external_name
        && !valid_external_name(n)
    {
        problem = Some(Problem {
            reason: Reason::InvalidAnnotation,
            message: format!(
                "{ANNOTATION_NAME} {n:?} is not a valid name (letters, digits, '-', '_', '.')"
            ),
        });
    }
    let tags = annotations
        .get(ANNOTATION_TAGS)
        .map(|t| split_list(t))
        .unwrap_or_default();
    let meta = annotations
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(ANNOTATION_META_PREFIX)
                .map(|key| (key.to_string(), v.clone()))
        })
        .collect();
    if problem.is_none() {
        problem = too_large(&tags, &meta);
    }
    // A problem with the annotation itself is reported once, against a placeholder catalog
    // list when none could be read.
    let catalogs = if catalogs.is_empty() {
        vec![String::new()]
    } else {
        catalogs
    };
    Some(Request {
        source: Source::Annotation {
            namespace: namespace.clone(),
            service: service.clone(),
        },
        namespace,
        service,
        catalogs,
        external_name,
        port,
        tags,
        meta,
        problem,
        created: svc.metadata.creation_timestamp.clone(),
    })
}

pub(super) fn request_from_registration(reg: &ExternalRegistration) -> Option<Request> {
    if reg.spec.direction != Direction::Export {
        return None;
    }
    let namespace = reg.metadata.namespace.clone()?;
    let name = reg.metadata.name.clone()?;
    let service = reg.spec.service.as_ref()?.name.clone();
    Some(Request {
        source: Source::Registration {
            namespace: namespace.clone(),
            name,
        },
        namespace,
        service,
        catalogs: vec![reg.spec.catalog_ref.name.clone()],
        external_name: reg.spec.external_name.clone(),
        port: reg.spec.port.clone(),
        tags: reg.spec.tags.clone(),
        meta: reg.spec.meta.clone(),
        problem: None,
        created: reg.metadata.creation_timestamp.clone(),
    })
}

/// Why tags and meta from annotations are more than an export may carry (the bounds the
/// ExternalRegistration schema sets), so that they are refused here, with a clear message,
/// not by the catalog.
fn too_large(tags: &[String], meta: &BTreeMap<String, String>) -> Option<Problem> {
    let why = if tags.len() > MAX_TAGS {
        format!(
            "{ANNOTATION_TAGS} holds {} tags; at most {MAX_TAGS}",
            tags.len()
        )
    } else if let Some(t) = tags.iter().find(|t| t.chars().count() > MAX_TAG_LENGTH) {
        format!(
            "{ANNOTATION_TAGS}: the tag {:?}… has {} characters; at most {MAX_TAG_LENGTH}",
            t.chars().take(20).collect::<String>(),
            t.chars().count()
        )
    } else if meta.len() > MAX_META {
        format!(
            "{} {ANNOTATION_META_PREFIX}* annotations; at most {MAX_META}",
            meta.len()
        )
    } else if let Some((k, v)) = meta
        .iter()
        .find(|(_, v)| v.chars().count() > MAX_META_VALUE_LENGTH)
    {
        format!(
            "{ANNOTATION_META_PREFIX}{k} has {} characters; at most {MAX_META_VALUE_LENGTH}",
            v.chars().count()
        )
    } else {
        return None;
    };
    Some(Problem {
        reason: Reason::InvalidAnnotation,
        message: format!(
            "{why} (too large for a catalog entry; nothing of this export is written)"
        ),
    })
}

fn split_list(s: &str) -> Vec<String> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect()
}

fn parse_port_ref(s: &str) -> PortRef {
    let s = s.trim();
    match s.parse::<u16>() {
        Ok(n) => PortRef::Number(i64::from(n)),
        Err(_) => PortRef::Name(s.to_string()),
    }
}

/// The characters every catalog accepts in a service name.
pub fn valid_external_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.starts_with(|c: char| c.is_ascii_alphanumeric())
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(annotations: &[(&str, String)]) -> CachedService {
        let mut a: BTreeMap<String, String> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        a.insert(ANNOTATION_EXPORT.into(), "consul".into());
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "api-x", "namespace": "shop", "annotations": a},
        }))
        .expect("a Service")
    }

    fn problem(annotations: &[(&str, String)]) -> Option<String> {
        request_from_annotations(&service(annotations))
            .and_then(|r| r.problem)
            .map(|p| format!("{}: {}", p.reason, p.message))
    }

    #[test]
    fn tags_and_meta_beyond_the_bounds_are_refused_with_a_clear_message() {
        let tags = |n: usize, len: usize| {
            (0..n)
                .map(|i| format!("{i:0len$}"))
                .collect::<Vec<_>>()
                .join(",")
        };
        assert_eq!(problem(&[(ANNOTATION_TAGS, tags(MAX_TAGS, 10))]), None);
        let many = problem(&[(ANNOTATION_TAGS, tags(MAX_TAGS + 1, 10))]).expect("too many");
        assert!(
            many.starts_with("InvalidAnnotation: catalog-bridge.io/tags holds 65 tags; at most 64"),
            "{many}"
        );
        let long = problem(&[(ANNOTATION_TAGS, tags(2, MAX_TAG_LENGTH + 1))]).expect("too long");
        assert!(long.contains("256 characters; at most 255"), "{long}");
        let value = problem(&[("catalog-bridge.io/meta.team", "x".repeat(513))]).expect("value");
        assert!(
            value.contains("catalog-bridge.io/meta.team has 513"),
            "{value}"
        );
    }
}
