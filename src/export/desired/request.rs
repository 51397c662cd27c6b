//! What one export asks for: read from a Service's annotations or an Export registration,
//! with what is wrong with it.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Service;

use super::Source;
use crate::api::crd::{Direction, ExternalRegistration, PortRef};
use crate::api::labels::{
    ANNOTATION_EXPORT, ANNOTATION_META_PREFIX, ANNOTATION_NAME, ANNOTATION_PORT, ANNOTATION_TAGS,
};
use crate::model::{Problem, Reason};

/// What one export asks for, once its source is parsed.
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
}

pub(super) fn request_from_annotations(svc: &Service) -> Option<Request> {
    let annotations = svc.metadata.annotations.as_ref()?;
    let export = annotations.get(ANNOTATION_EXPORT)?;
    let namespace = svc.metadata.namespace.clone()?;
    let service = svc.metadata.name.clone()?;
    let catalogs: Vec<String> = split_list(export);
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
