//! The engine's `docker network …` operations: list, inspect, create, remove, connect,
//! disconnect and prune, over the records of [`super::store`] and the containers'
//! endpoints.

use std::net::Ipv4Addr;

use super::store::{builtin_id, NetworkRecord, NetworkRequest, BUILTIN};
use super::{EndpointSpec, NetworkError, NetworkMode, DEFAULT_GATEWAY, DEFAULT_NETWORK};
use crate::runtime::{Engine, EngineError};

/// A network as `docker network ls/inspect` shows it.
#[derive(Debug, Clone)]
pub struct NetworkView {
    /// Id.
    pub id: String,
    /// Name.
    pub name: String,
    /// `bridge`, `host` or `null`.
    pub driver: &'static str,
    /// RFC 3339; empty for built-in networks.
    pub created: String,
    /// Subnet and gateway, for bridge networks.
    pub ipam: Option<(String, Ipv4Addr)>,
    /// The stored record, for user-defined networks.
    pub record: Option<NetworkRecord>,
    /// Running containers on it: id, name, endpoint (address, prefix, MAC).
    pub containers: Vec<AttachedContainer>,
}

/// A running container's endpoint on a network.
#[derive(Debug, Clone)]
pub struct AttachedContainer {
    /// Container id.
    pub id: String,
    /// Container name.
    pub name: String,
    /// Its address.
    pub address: Ipv4Addr,
    /// The prefix length.
    pub prefix_len: u8,
    /// Its MAC.
    pub mac: [u8; 6],
}

impl Engine {
    /// `docker network ls`: the built-in networks, then the user-defined ones.
    pub fn network_list(&self) -> Vec<NetworkView> {
        let mut views: Vec<NetworkView> = BUILTIN.iter().map(|n| self.builtin_view(n)).collect();
        views.extend(self.networks.list().into_iter().map(|r| self.user_view(r)));
        views
    }

    /// `docker network inspect`: by name, id or id prefix.
    pub fn network_inspect(&self, reference: &str) -> Result<NetworkView, EngineError> {
        if let Some(name) = BUILTIN
            .iter()
            .find(|n| **n == reference || builtin_id(n).starts_with(reference))
            .filter(|_| !reference.is_empty())
        {
            return Ok(self.builtin_view(name));
        }
        let (record, _) = self.networks.get(reference)?;
        Ok(self.user_view(record))
    }

    /// `docker network create`.
    pub fn network_create(&self, request: NetworkRequest) -> Result<NetworkRecord, EngineError> {
        let record = self.networks.create(request)?;
        self.events.emit(
            "network",
            "create",
            &record.id,
            [("name", record.name.clone()), ("type", "bridge".to_owned())],
        );
        Ok(record)
    }

    /// `docker network rm`: refused for built-in networks and networks containers use.
    pub fn network_remove(&self, reference: &str) -> Result<(), EngineError> {
        if BUILTIN.contains(&reference) {
            return Err(NetworkError::Builtin(reference.to_owned()).into());
        }
        let (record, _) = self.networks.get(reference)?;
        if self.network_users(&record).next().is_some() {
            return Err(NetworkError::InUse(record.name, record.id).into());
        }
        self.networks.remove(&record.id)?;
        self.events.emit(
            "network",
            "destroy",
            &record.id,
            [("name", record.name), ("type", "bridge".to_owned())],
        );
        Ok(())
    }

    /// `docker network prune`: removes every user-defined network no container uses;
    /// returns their names.
    pub fn network_prune(&self) -> Vec<String> {
        let mut removed = Vec::new();
        for record in self.networks.list() {
            if self.network_users(&record).next().is_none()
                && self.network_remove(&record.id).is_ok()
            {
                removed.push(record.name);
            }
        }
        removed
    }

    /// `docker network connect`: the container joins the network at its next start, and a
    /// running one is plugged in at once (a new `ethN`, no change to its default route).
    pub async fn network_connect(
        &self,
        reference: &str,
        container: &str,
        aliases: Vec<String>,
    ) -> Result<(), EngineError> {
        let (record, _) = self.networks.get(reference)?;
        let container = self.container(container)?;
        let _lifecycle = container.lifecycle.lock().await;
        let current = container.record();
        let mode = NetworkMode::parse(&current.spec.host.network_mode)?;
        if matches!(
            mode,
            NetworkMode::Host | NetworkMode::None | NetworkMode::Container(_)
        ) {
            return Err(EngineError::InvalidArgument(
                "container sharing network namespace with another container or host cannot be connected to any other network".into(),
            ));
        }
        // A created container may be connected again (compose disconnects and reconnects
        // with aliases); a running one has at most one endpoint per network.
        let plugged = current
            .network
            .endpoints
            .iter()
            .any(|e| e.network_id == record.id);
        if plugged {
            return Err(NetworkError::Invalid(format!(
                "endpoint with name {} already exists in network {}",
                current.name, record.name
            ))
            .into());
        }
        if container.status().is_running() {
            self.plug_running(&container, &record, &aliases).await?;
        }
        container
            .update(|r| {
                r.spec
                    .host
                    .endpoints
                    .insert(record.name.clone(), EndpointSpec { aliases });
            })
            .map_err(|e| EngineError::Io("store the container", e))?;
        Ok(())
    }

    async fn plug_running(
        &self,
        container: &std::sync::Arc<crate::containers::Container>,
        network: &NetworkRecord,
        aliases: &[String],
    ) -> Result<(), EngineError> {
        let session = self.running_session(container).await?;
        let used: Vec<String> = container
            .record()
            .network
            .endpoints
            .iter()
            .map(|e| e.ifname.clone())
            .collect();
        let ifname = (0..)
            .map(|n| format!("eth{n}"))
            .find(|name| !used.contains(name))
            .expect("an unbounded search finds a free name");
        let mut host = container.record().spec.host;
        host.endpoints.insert(
            network.name.clone(),
            EndpointSpec {
                aliases: aliases.to_vec(),
            },
        );
        let endpoint = self.allocate_endpoint(Some(&network.name), &host, &ifname)?;
        let request = agent_protocol::NetworkAttachment {
            id: container.id.clone(),
            endpoint: endpoint.to_wire(),
        };
        if let Err(e) = session.call(move |a| a.connect_network(request)).await {
            self.release_endpoint(&endpoint);
            return Err(e.into());
        }
        container
            .update(|r| r.network.endpoints.push(endpoint))
            .map_err(|e| EngineError::Io("store the container", e))?;
        self.refresh_dns(&session, std::slice::from_ref(&network.id))
            .await;
        Ok(())
    }

    /// `docker network disconnect`: a running container's interface on the network is
    /// removed at once.
    pub async fn network_disconnect(
        &self,
        reference: &str,
        container: &str,
    ) -> Result<(), EngineError> {
        let (record, _) = self.networks.get(reference)?;
        let container = self.container(container)?;
        let _lifecycle = container.lifecycle.lock().await;
        let mode = NetworkMode::parse(&container.record().spec.host.network_mode)?;
        let own = matches!(&mode, NetworkMode::Named(n) if *n == record.name || *n == record.id);
        let removed = container
            .update(|r| {
                let by_name = r.spec.host.endpoints.remove(&record.name).is_some();
                let by_id = r.spec.host.endpoints.remove(&record.id).is_some();
                by_name || by_id
            })
            .map_err(|e| EngineError::Io("store the container", e))?;
        // The network `--network` names stays the container's (its next start joins it);
        // compose disconnects from it only to connect again with aliases.
        if !removed && !own {
            return Err(EngineError::InvalidArgument(format!(
                "container {} is not connected to network {}",
                container.id, record.name
            )));
        }
        let endpoint = container
            .record()
            .network
            .endpoints
            .into_iter()
            .find(|e| e.network_id == record.id);
        if let (Some(endpoint), true) = (endpoint, container.status().is_running()) {
            let session = self.running_session(&container).await?;
            let request = agent_protocol::NetworkDetachment {
                id: container.id.clone(),
                ifname: endpoint.ifname.clone(),
            };
            session.call(move |a| a.disconnect_network(request)).await?;
            self.release_endpoint(&endpoint);
            container
                .update(|r| r.network.endpoints.retain(|e| e.network_id != record.id))
                .map_err(|e| EngineError::Io("store the container", e))?;
            self.refresh_dns(&session, std::slice::from_ref(&record.id))
                .await;
        }
        Ok(())
    }

    /// Checks at create that the user networks a spec names exist.
    pub fn check_networks(
        &self,
        spec: &crate::containers::spec::ContainerSpec,
    ) -> Result<(), EngineError> {
        if let NetworkMode::Named(name) = NetworkMode::parse(&spec.host.network_mode)? {
            self.networks.get(&name)?;
        }
        for name in spec.host.endpoints.keys() {
            self.networks.get(name)?;
        }
        Ok(())
    }

    /// Containers whose spec names `record` (running or not).
    fn network_users<'a>(&'a self, record: &'a NetworkRecord) -> impl Iterator<Item = String> + 'a {
        self.list().into_iter().filter_map(move |c| {
            let r = c.record();
            let host = &r.spec.host;
            let named = host.network_mode == record.name
                || host.network_mode == record.id
                || host.endpoints.contains_key(&record.name)
                || host.endpoints.contains_key(&record.id);
            named.then_some(r.id)
        })
    }

    fn attached(&self, network_id: &str) -> Vec<AttachedContainer> {
        let mut attached = Vec::new();
        for container in self.list() {
            let record = container.record();
            for endpoint in &record.network.endpoints {
                if endpoint.network_id == network_id {
                    attached.push(AttachedContainer {
                        id: record.id.clone(),
                        name: record.name.clone(),
                        address: endpoint.address,
                        prefix_len: endpoint.prefix_len,
                        mac: endpoint.mac,
                    });
                }
            }
        }
        attached
    }

    fn builtin_view(&self, name: &str) -> NetworkView {
        let id = builtin_id(name);
        let (driver, ipam) = match name {
            DEFAULT_NETWORK => (
                "bridge",
                Some((
                    format!("{}/{}", super::DEFAULT_SUBNET, super::DEFAULT_PREFIX_LEN),
                    DEFAULT_GATEWAY,
                )),
            ),
            "host" => ("host", None),
            _ => ("null", None),
        };
        NetworkView {
            containers: self.attached(&id),
            id,
            name: name.to_owned(),
            driver,
            created: String::new(),
            ipam,
            record: None,
        }
    }

    fn user_view(&self, record: NetworkRecord) -> NetworkView {
        NetworkView {
            id: record.id.clone(),
            name: record.name.clone(),
            driver: "bridge",
            created: record.created.clone(),
            ipam: Some((
                format!("{}/{}", record.subnet, record.prefix_len),
                record.gateway,
            )),
            containers: self.attached(&record.id),
            record: Some(record),
        }
    }
}
