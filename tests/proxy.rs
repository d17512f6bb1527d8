//! End-to-end tests of the request path: the real binary, a real upstream, real HTTP.

mod common;

use common::*;

#[tokio::test]
async fn key_in_each_header_is_admitted_and_never_forwarded() {
    let upstream = Upstream::start("a").await;
    let config = GatewayConfig::single_route(&[upstream.addr]);
    config.write();
    let (record, key) = create_key(&config.path(), "alice", &["read"], None);
    let _gateway = Gateway::start(&config).await;
    let client = client();
    for (header, value) in [
        ("x-api-key", key.clone()),
        ("key", key.clone()),
        ("authorization", format!("Bearer {key}")),
    ] {
        let resp = client
            .get(format!("{}/hello?x=1", config.base_url()))
            .header(header, &value)
            .send()
            .await
            .expect("request");
        assert_eq!(resp.status(), 200, "{header}");
        assert!(resp.headers().contains_key("x-request-id"));
        let seen = upstream.seen().pop().expect("upstream saw the request");
        assert_eq!(seen.path_and_query, "/hello?x=1");
        assert!(!seen.has_header(header), "{header} was forwarded");
        assert!(!seen.all_header_text().contains(&key), "key leaked via {header}");
        assert_eq!(seen.header("x-keygate-key-id").as_deref(), record["id"].as_str());
        assert_eq!(seen.header("x-keygate-owner").as_deref(), Some("alice"));
        assert_eq!(seen.header("x-keygate-scopes").as_deref(), Some("read"));
        assert!(seen.has_header("x-request-id"));
    }
}
