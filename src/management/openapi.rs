//! The OpenAPI 3.1 document of the management API, served at `<path>/openapi.json`.

pub(super) const DOCUMENT: &[u8] = include_bytes!("openapi.json");

#[cfg(test)]
mod tests {
    use http::Method;
    use serde_json::Value;

    use super::DOCUMENT;
    use crate::management::call::Call;

    #[test]
    fn openapi_document_describes_exactly_the_served_api() {
        let doc: Value = serde_json::from_slice(DOCUMENT).expect("valid JSON");
        assert!(
            doc["openapi"]
                .as_str()
                .is_some_and(|v| v.starts_with("3.1"))
        );
        let mut documented: Vec<String> = doc["paths"]
            .as_object()
            .expect("paths")
            .iter()
            .flat_map(|(path, item)| {
                item.as_object()
                    .expect("path item")
                    .keys()
                    .filter(|k| ["get", "post", "put", "patch", "delete"].contains(&k.as_str()))
                    .map(move |method| format!("{} {path}", method.to_uppercase()))
            })
            .collect();
        documented.sort();
        let served = [
            "DELETE /keys/{id}",
            "GET /audit",
            "GET /keys",
            "GET /keys/{id}",
            "GET /openapi.json",
            "POST /keys",
            "POST /keys/revoke",
            "POST /keys/{id}/rotate",
            "POST /signup",
        ];
        assert_eq!(documented, served);
        // Each documented operation is routed.
        for entry in served {
            let (method, path) = entry.split_once(' ').expect("method and path");
            let method: Method = method.parse().expect("method");
            let path = path.replace("{id}", "01KEY");
            assert!(
                Call::parse(&path, &method, true).is_ok(),
                "{entry} is not routed"
            );
        }
    }
}
