//! Transport security: TLS on the gRPC listener (with renewal), mTLS for agents, per-agent
//! credentials, and HTTPS receivers. Certificates are made by the tests (rcgen).

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use herald_client::v1 as pb;
use herald_tests::harness::{self, Herald};
use herald_tests::pki::{Ca, Issued};
use herald_tests::receiver::Reply;
use herald_tests::{Backend, Receiver, eventually};
use tonic::Code;

use crate::delivery::{subscribe, user_new};

/// A control plane serving TLS with a certificate for localhost from `ca`.
async fn tls_control_plane(dir: &Path, ca: &Ca, client_ca: Option<&Path>) -> (Herald, Issued) {
    let server = ca.issue(&["localhost", "127.0.0.1"], 1, dir, "server");
    let (cert, key) = (server.cert_path.clone(), server.key_path.clone());
    let client_ca = client_ca.map(Path::to_path_buf);
    let herald = Herald::builder(Backend::Sqlite)
        .no_builtin_agent()
        .configure(move |c| {
            c.tls_cert = Some(cert);
            c.tls_key = Some(key);
            c.tls_client_ca = client_ca;
        })
        .start()
        .await;
    (herald, server)
}

fn https_url(herald: &Herald) -> String {
    format!("https://localhost:{}", herald.addr.port())
}

fn tls_client(herald: &Herald, ca: &Path, token: &str) -> herald_client::HeraldClient {
    let options = herald_client::Options {
        tls: herald_client::Tls {
            ca: Some(ca.to_owned()),
            client_cert: None,
        },
        ..Default::default()
    };
    herald_client::HeraldClient::with_options(&https_url(herald), token, options).unwrap()
}

async fn list_agents(client: &herald_client::HeraldClient) -> Vec<pb::AgentInfo> {
    client
        .admin()
        .list_agents(pb::ListAgentsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .agents
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_serves_the_right_ca_and_refuses_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Herald test CA");
    let ca_path = ca.write(dir.path(), "ca.pem");
    let wrong = Ca::new("Some other CA");
    let wrong_path = wrong.write(dir.path(), "wrong.pem");
    let (herald, _) = tls_control_plane(dir.path(), &ca, None).await;

    let admin = tls_client(&herald, &ca_path, &herald.admin_token);
    admin
        .admin()
        .list_tenants(pb::ListTenantsRequest::default())
        .await
        .unwrap();

    let distrusting = tls_client(&herald, &wrong_path, &herald.admin_token);
    let refused = distrusting
        .admin()
        .list_tenants(pb::ListTenantsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused}");

    let plaintext = herald_client::HeraldClient::connect(
        &format!("http://{}", herald.addr),
        &herald.admin_token,
    )
    .unwrap();
    let refused = plaintext
        .admin()
        .list_tenants(pb::ListTenantsRequest::default())
        .await
        .expect_err("a plaintext client gets no answer from a TLS listener");
    // Unavailable, Cancelled or Unknown depending on when the transport notices.
    assert_ne!(refused.code(), Code::Ok);

    // The CLI says what went wrong in one line and exits 6 (unavailable).
    let output = tokio::process::Command::new(harness::binary("herald"))
        .args(["--addr", &https_url(&herald), "--tls-ca"])
        .arg(&wrong_path)
        .args(["--token", &herald.admin_token, "tenants", "list"])
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(6), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");

    // An agent that trusts the CA connects and delivers.
    let mut agent = harness::spawn_agent(&[
        ("HERALD_CONTROL_PLANE", https_url(&herald)),
        ("HERALD_AGENT_TOKEN", herald.agent_token.clone()),
        ("HERALD_TLS_CA", ca_path.display().to_string()),
        ("HERALD_AGENT_ID", "tls-1".into()),
        ("HERALD_ALLOW_DESTINATIONS", "127.0.0.0/8".into()),
    ]);
    eventually(
        "the agent connected over TLS",
        Duration::from_secs(15),
        || {
            let admin = admin.clone();
            async move { (list_agents(&admin).await.len() == 1).then_some(()) }
        },
    )
    .await;
    let receiver = Receiver::start().await;
    let (_, tenant_token) = harness::create_tenant(&admin, "acme", "t").await;
    let client = tls_client(&herald, &ca_path, &tenant_token);
    subscribe(&client, receiver.url("/"), |_| {}).await;
    client.publish(user_new(1)).await.unwrap();
    receiver.wait_for(1, Duration::from_secs(20)).await;
    agent.terminate().await;
    herald.stop().await;
}

/// Opens `AgentService.Connect` with `channel` and `token` and returns the status it ends with.
async fn connect_status(
    channel: tonic::transport::Channel,
    token: &str,
    region: &str,
) -> tonic::Status {
    let mut client = pb::agent_service_client::AgentServiceClient::new(channel);
    let hello = pb::AgentMessage {
        message: Some(pb::agent_message::Message::Hello(pb::Hello {
            agent_id: "probe".into(),
            region: region.into(),
            capacity: 1,
            version: "test".into(),
        })),
    };
    let mut request =
        tonic::Request::new(tokio_stream::iter(vec![hello]).chain(tokio_stream::pending()));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    match client.connect(request).await {
        Err(status) => status,
        Ok(response) => {
            let mut stream = response.into_inner();
            loop {
                match stream.message().await {
                    Ok(Some(_)) => continue,
                    Ok(None) => return tonic::Status::ok("stream ended"),
                    Err(status) => return status,
                }
            }
        }
    }
}

use tokio_stream::StreamExt as _;

fn tls_channel(herald: &Herald, ca: &Path, identity: Option<&Issued>) -> tonic::transport::Channel {
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            std::fs::read(ca).unwrap(),
        ))
        .domain_name("localhost");
    if let Some(issued) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(
            &issued.cert_pem,
            &issued.key_pem,
        ));
    }
    tonic::transport::Endpoint::from_shared(https_url(herald))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect_lazy()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_admits_only_agents_with_a_certificate_from_the_client_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Herald test CA");
    let ca_path = ca.write(dir.path(), "ca.pem");
    let agents_ca = Ca::new("Herald agents CA");
    let agents_ca_path = agents_ca.write(dir.path(), "agents-ca.pem");
    let (herald, _) = tls_control_plane(dir.path(), &ca, Some(&agents_ca_path)).await;
    let admin = tls_client(&herald, &ca_path, &herald.admin_token);
    // API callers need no client certificate.
    admin
        .admin()
        .list_tenants(pb::ListTenantsRequest::default())
        .await
        .unwrap();

    let without = connect_status(
        tls_channel(&herald, &ca_path, None),
        &herald.agent_token,
        "eu",
    )
    .await;
    assert_eq!(without.code(), Code::Unauthenticated, "{without}");
    assert!(
        without.message().contains("client certificate"),
        "{without}"
    );

    let stranger = Ca::new("Some other CA").issue(&["rogue.herald.test"], 7, dir.path(), "rogue");
    let foreign = connect_status(
        tls_channel(&herald, &ca_path, Some(&stranger)),
        &herald.agent_token,
        "eu",
    )
    .await;
    assert_ne!(foreign.code(), Code::Ok, "{foreign}");
    assert!(list_agents(&admin).await.is_empty());

    let agent_cert = agents_ca.issue(&["agent-eu-1.herald.test"], 3, dir.path(), "agent");
    let mut agent = harness::spawn_agent(&[
        ("HERALD_CONTROL_PLANE", https_url(&herald)),
        ("HERALD_AGENT_TOKEN", herald.agent_token.clone()),
        ("HERALD_TLS_CA", ca_path.display().to_string()),
        (
            "HERALD_TLS_CLIENT_CERT",
            agent_cert.cert_path.display().to_string(),
        ),
        (
            "HERALD_TLS_CLIENT_KEY",
            agent_cert.key_path.display().to_string(),
        ),
        ("HERALD_REGION", "eu".into()),
    ]);
    let agents = eventually("the mTLS agent connected", Duration::from_secs(15), || {
        let admin = admin.clone();
        async move {
            let agents = list_agents(&admin).await;
            (!agents.is_empty()).then_some(agents)
        }
    })
    .await;
    assert_eq!(agents[0].identity, "agent-eu-1.herald.test");
    agent.terminate().await;
    herald.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_agent_credentials_pin_regions_and_revocation_disconnects_at_once() {
    let herald = Herald::builder(Backend::Sqlite)
        .no_builtin_agent()
        .start()
        .await;
    let admin = herald.admin();
    let credential = admin
        .admin()
        .create_agent_credential(pb::CreateAgentCredentialRequest {
            name: "eu-1".into(),
            region: "eu".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(credential.token.starts_with("hrla_"));
    let listed = admin
        .admin()
        .list_agent_credentials(pb::ListAgentCredentialsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .credentials;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].region, "eu");

    // Pinned to eu: a hello announcing us is refused; an API token is no agent credential.
    let channel = herald.admin().channel();
    let wrong_region = connect_status(channel.clone(), &credential.token, "us").await;
    assert_eq!(
        wrong_region.code(),
        Code::PermissionDenied,
        "{wrong_region}"
    );
    let api_token = connect_status(channel, &herald.admin_token, "eu").await;
    assert_eq!(api_token.code(), Code::Unauthenticated, "{api_token}");

    let receiver = Receiver::start().await;
    receiver.default_reply(Reply {
        status: 200,
        headers: vec![],
        delay: Duration::from_millis(1500),
    });
    let (_, client) = herald.tenant("acme").await;
    subscribe(&client, receiver.url("/"), |r| r.region = "eu".into()).await;
    let mut revoked = harness::spawn_agent(&[
        ("HERALD_CONTROL_PLANE", herald.url()),
        ("HERALD_AGENT_TOKEN", credential.token.clone()),
        ("HERALD_REGION", "eu".into()),
        ("HERALD_AGENT_ID", "eu-revoked".into()),
        ("HERALD_ALLOW_DESTINATIONS", "127.0.0.0/8".into()),
    ]);
    let mut published = HashSet::new();
    for i in 0..5 {
        published.insert(client.publish(user_new(i)).await.unwrap().event_id);
    }
    eventually(
        "jobs in flight at the credentialed agent",
        Duration::from_secs(15),
        || {
            let admin = admin.clone();
            async move {
                list_agents(&admin)
                    .await
                    .iter()
                    .any(|a| a.agent_id == "eu-revoked" && a.in_flight > 0)
                    .then_some(())
            }
        },
    )
    .await;
    let mut other = harness::spawn_agent(&[
        ("HERALD_CONTROL_PLANE", herald.url()),
        ("HERALD_AGENT_TOKEN", herald.agent_token.clone()),
        ("HERALD_REGION", "eu".into()),
        ("HERALD_AGENT_ID", "eu-shared".into()),
        ("HERALD_ALLOW_DESTINATIONS", "127.0.0.0/8".into()),
    ]);
    eventually(
        "the second agent connected",
        Duration::from_secs(15),
        || {
            let admin = admin.clone();
            async move {
                list_agents(&admin)
                    .await
                    .iter()
                    .any(|a| a.agent_id == "eu-shared")
                    .then_some(())
            }
        },
    )
    .await;
    let revoking = Instant::now();
    admin
        .admin()
        .revoke_agent_credential(pb::RevokeAgentCredentialRequest {
            credential_id: credential.credential_id.clone(),
        })
        .await
        .unwrap();
    eventually(
        "the revoked agent disconnected",
        Duration::from_secs(10),
        || {
            let admin = admin.clone();
            async move {
                (!list_agents(&admin)
                    .await
                    .iter()
                    .any(|a| a.agent_id == "eu-revoked"))
                .then_some(())
            }
        },
    )
    .await;
    println!("revoked agent disconnected after {:?}", revoking.elapsed());
    eventually("every event delivered", Duration::from_secs(30), || {
        let got: HashSet<String> = receiver
            .received()
            .iter()
            .filter_map(|r| r.header("webhook-id").map(str::to_owned))
            .collect();
        let published = published.clone();
        async move { published.is_subset(&got).then_some(()) }
    })
    .await;
    revoked.terminate().await;
    other.terminate().await;
    herald.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_receivers_are_verified_against_the_extra_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Receiver CA");
    let ca_path = ca.write(dir.path(), "receiver-ca.pem");
    let cert = ca.issue(&["localhost"], 11, dir.path(), "receiver");
    let receiver = Receiver::start_tls(&cert.cert_pem, &cert.key_pem).await;
    let url = format!("https://localhost:{}/hook", receiver.addr.port());
    let herald = Herald::builder(Backend::Sqlite)
        .no_builtin_agent()
        .start()
        .await;
    let common = |id: &str, region: &str| {
        vec![
            ("HERALD_CONTROL_PLANE", herald.url()),
            ("HERALD_AGENT_TOKEN", herald.agent_token.clone()),
            ("HERALD_AGENT_ID", id.to_owned()),
            ("HERALD_REGION", region.to_owned()),
            (
                "HERALD_ALLOW_DESTINATIONS",
                "127.0.0.0/8,::1/128".to_owned(),
            ),
        ]
    };
    let mut trusting_env = common("trusting", "trusting");
    trusting_env.push(("HERALD_EXTRA_CA", ca_path.display().to_string()));
    let mut trusting = harness::spawn_agent(&trusting_env);
    let mut plain = harness::spawn_agent(&common("plain", "plain"));
    let (_, client) = herald.tenant("acme").await;
    let trusted = subscribe(&client, url.clone(), |r| r.region = "trusting".into()).await;
    let distrusted = subscribe(&client, url.clone(), |r| {
        r.region = "plain".into();
        r.max_attempts = 1;
    })
    .await;
    let published = client.publish(user_new(1)).await.unwrap();
    let got = receiver.wait_for(1, Duration::from_secs(20)).await;
    standardwebhooks::Webhook::new(&trusted.signing_secret)
        .unwrap()
        .verify(&got[0].body, &got[0].headers)
        .unwrap();
    let delivery_of = |subscription_id: String| {
        let client = client.clone();
        let event_id = published.event_id.clone();
        async move {
            let deliveries = client
                .deliveries()
                .list_deliveries(pb::ListDeliveriesRequest {
                    event_id,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner()
                .deliveries;
            let id = deliveries
                .into_iter()
                .find(|d| d.subscription_id == subscription_id)?
                .id;
            let delivery = client
                .deliveries()
                .get_delivery(pb::GetDeliveryRequest {
                    id,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            (!delivery.attempts.is_empty()).then_some(delivery)
        }
    };
    let refused = eventually(
        "the distrusting agent's attempt",
        Duration::from_secs(20),
        || delivery_of(distrusted.id.clone()),
    )
    .await;
    assert_eq!(
        refused.attempts[0].error,
        pb::AttemptError::Tls as i32,
        "{:?}",
        refused.attempts[0]
    );
    let delivered = eventually(
        "the trusting agent's attempt",
        Duration::from_secs(20),
        || delivery_of(trusted.id.clone()),
    )
    .await;
    assert_eq!(delivered.attempts[0].status_code, 200);
    assert_eq!(
        receiver.received().len(),
        1,
        "the distrusting agent sent nothing over an unverified connection"
    );
    trusting.terminate().await;
    plain.terminate().await;
    herald.stop().await;
}

/// Returns the serial number of the certificate a new TLS connection is served.
async fn served_serial(port: u16, ca_pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).unwrap();
    parsed.raw_serial().to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("Herald test CA");
    let (herald, _) = tls_control_plane(dir.path(), &ca, None).await;
    let port = herald.addr.port();
    assert_eq!(
        served_serial(port, &ca.pem).await,
        1u64.to_be_bytes()
            .to_vec()
            .into_iter()
            .skip_while(|b| *b == 0)
            .collect::<Vec<_>>()
    );
    // Renewal: the files are replaced in place, as certbot or cert-manager would.
    ca.issue(&["localhost", "127.0.0.1"], 2, dir.path(), "server");
    eventually(
        "the new certificate served",
        Duration::from_secs(10),
        || {
            let pem = ca.pem.clone();
            async move { (served_serial(port, &pem).await == vec![2u8]).then_some(()) }
        },
    )
    .await;
    herald.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_manages_agent_credentials() {
    let herald = Herald::builder(Backend::Sqlite)
        .no_builtin_agent()
        .start()
        .await;
    let herald_cli = |args: &[&str]| {
        let mut command = tokio::process::Command::new(harness::binary("herald"));
        command
            .args(["--addr", &herald.url(), "--token", &herald.admin_token])
            .args(args);
        command
    };
    let created = herald_cli(&[
        "--quiet",
        "agents",
        "credentials",
        "create",
        "--name",
        "eu-1",
        "--region",
        "eu",
    ])
    .output()
    .await
    .unwrap();
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let token = String::from_utf8(created.stdout).unwrap().trim().to_owned();
    assert!(token.starts_with("hrla_"), "{token}");
    let listed = herald_cli(&["--json", "agents", "credentials", "list"])
        .output()
        .await
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let id = json["credentials"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(json["credentials"][0]["region"], "eu");
    let revoked = herald_cli(&["agents", "credentials", "revoke", &id])
        .output()
        .await
        .unwrap();
    assert!(revoked.status.success());
    let refused = connect_status(herald.admin().channel(), &token, "eu").await;
    assert_eq!(
        refused.code(),
        Code::Unauthenticated,
        "a revoked credential is refused: {refused}"
    );
    herald.stop().await;
}
