//! Scoped services: a registry of singletons, scoped values and transients, a fresh scope for every
//! unit of work, and validation of the whole dependency graph when the host is built.
//!
//! Hosted services are singletons, so a per-run resource (a DB transaction, say) must come from a scope
//! made for that run. In .NET a mistake here is caught only in Development; here it is an error from
//! [`HostBuilder::build`](crate::HostBuilder::build), always.
//!
//! ```
//! use stevedore::scope::{Scoped, ServiceCollection, Singleton};
//! use stevedore::{BoxError, RunOutcome};
//!
//! struct Config { url: String }
//! struct Db { url: String, writes: Vec<String> }
//!
//! let services = ServiceCollection::new()
//!     .singleton_value(Config { url: "sqlite::memory:".into() })
//!     .scoped_with_end(
//!         |config: Singleton<Config>| async move {
//!             Ok::<_, BoxError>(Db { url: config.url.clone(), writes: Vec::new() })
//!         },
//!         |db: Db, outcome: RunOutcome| async move {
//!             // commit on success, roll back otherwise
//!             println!("{} writes to {}: {}", db.writes.len(), db.url, outcome.as_str());
//!             Ok::<_, BoxError>(())
//!         },
//!     );
//! # let _ = services;
//! ```

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::{BoxError, BuildError};
use crate::handler::{FromScope, Handler};
use crate::service::{BoxFuture, ServiceContext};
use crate::status::RunOutcome;

/// How long a registered value lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lifetime {
    /// One for the host's whole life, made when the host starts.
    Singleton,
    /// One per unit of work (a tick, a task, a job, a message, a request), ended with it.
    Scoped,
    /// A fresh one each time it is asked for.
    Transient,
}

impl Lifetime {
    /// Lower-case name, as used in error messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Lifetime::Singleton => "singleton",
            Lifetime::Scoped => "scoped",
            Lifetime::Transient => "transient",
        }
    }
}

/// One thing a handler or factory needs, as declared by its parameter types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dependency {
    /// The needed type.
    pub type_id: TypeId,
    /// Its full name (see [`short_type_name`] for messages).
    pub type_name: &'static str,
    /// The lifetime the parameter asks for.
    pub lifetime: Lifetime,
}

impl Dependency {
    /// The dependency on `T` with `lifetime`.
    pub fn of<T: 'static>(lifetime: Lifetime) -> Self {
        Dependency { type_id: TypeId::of::<T>(), type_name: std::any::type_name::<T>(), lifetime }
    }
}

/// `my_app::db::EmployeeDb` becomes `EmployeeDb`, and `stevedore::scope::Scoped<my_app::Db>` becomes
/// `Scoped<Db>`: module paths are dropped for messages.
pub fn short_type_name<T: ?Sized>() -> String {
    shorten(std::any::type_name::<T>())
}

fn shorten(full: &str) -> String {
    let mut out = String::with_capacity(full.len());
    let mut segment = String::new();
    for ch in full.chars() {
        if ch.is_alphanumeric() || matches!(ch, '_' | ':' | '{' | '}') {
            segment.push(ch);
        } else {
            out.push_str(segment.rsplit("::").next().unwrap_or(&segment));
            segment.clear();
            out.push(ch);
        }
    }
    out.push_str(segment.rsplit("::").next().unwrap_or(&segment));
    out
}

type AnyValue = Box<dyn Any + Send + Sync>;
type Shared = Arc<dyn Any + Send + Sync>;
type Make = Arc<dyn for<'a> Fn(&'a Scope) -> BoxFuture<'a, Result<AnyValue, BoxError>> + Send + Sync>;
type End = Arc<dyn Fn(AnyValue, RunOutcome) -> BoxFuture<'static, Result<(), BoxError>> + Send + Sync>;

struct Registration {
    type_name: String,
    lifetime: Lifetime,
    deps: Vec<Dependency>,
    make: Make,
    end: Option<End>,
    /// Takes a scoped value's `T` back out of its shared cell, so its end hook can own it.
    take_scoped: fn(Shared) -> Option<AnyValue>,
}

fn take_scoped<T: Send + Sync + 'static>(value: Shared) -> Option<AnyValue> {
    let cell = value.downcast::<tokio::sync::Mutex<T>>().ok()?;
    let inner = Arc::try_unwrap(cell).ok()?.into_inner();
    Some(Box::new(inner))
}

/// The registry of everything handlers may ask for. Give it to the host with
/// [`HostBuilder::services`](crate::HostBuilder::services).
#[derive(Default)]
pub struct ServiceCollection {
    regs: HashMap<TypeId, Registration>,
    order: Vec<TypeId>,
}

impl std::fmt::Debug for ServiceCollection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<_> =
            self.order.iter().filter_map(|t| self.regs.get(t)).map(|r| (r.type_name.as_str(), r.lifetime)).collect();
        f.debug_struct("ServiceCollection").field("registered", &names).finish()
    }
}

impl ServiceCollection {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    fn register<T: Send + Sync + 'static, Args, H: Handler<Args, T>>(
        mut self,
        lifetime: Lifetime,
        factory: H,
        end: Option<End>,
    ) -> Self {
        let make: Make = Arc::new(move |scope: &Scope| {
            let factory = factory.clone();
            Box::pin(async move { factory.call(scope).await.map(|v| Box::new(v) as AnyValue) })
        });
        let id = TypeId::of::<T>();
        if !self.regs.contains_key(&id) {
            self.order.push(id);
        }
        // A later registration of the same type replaces the earlier one, as in .NET.
        self.regs.insert(
            id,
            Registration {
                type_name: short_type_name::<T>(),
                lifetime,
                deps: H::dependencies(),
                make,
                end,
                take_scoped: take_scoped::<T>,
            },
        );
        self
    }

    /// Registers a singleton made by an async factory whose parameters are extractors (other singletons).
    pub fn singleton<T: Send + Sync + 'static, Args>(self, factory: impl Handler<Args, T>) -> Self {
        self.register(Lifetime::Singleton, factory, None)
    }

    /// Registers a ready-made singleton.
    pub fn singleton_value<T: Send + Sync + 'static>(self, value: T) -> Self {
        let cell = Arc::new(Mutex::new(Some(value)));
        self.singleton(move || {
            let cell = cell.clone();
            async move {
                let taken = cell.lock().map_err(|_| BoxError::from("singleton cell poisoned"))?.take();
                taken.ok_or_else(|| BoxError::from("singleton value was already taken"))
            }
        })
    }

    /// Registers a scoped value: made at most once per scope, on first use, ended with the scope.
    pub fn scoped<T: Send + Sync + 'static, Args>(self, factory: impl Handler<Args, T>) -> Self {
        self.register(Lifetime::Scoped, factory, None)
    }

    /// Registers a scoped value with an async end hook that receives the value and the run's outcome:
    /// commit on success, roll back otherwise. An error from the hook is reported with the run.
    pub fn scoped_with_end<T, Args, E, EFut, Err>(self, factory: impl Handler<Args, T>, on_end: E) -> Self
    where
        T: Send + Sync + 'static,
        E: Fn(T, RunOutcome) -> EFut + Send + Sync + 'static,
        EFut: Future<Output = Result<(), Err>> + Send + 'static,
        Err: Into<BoxError>,
    {
        let end: End = Arc::new(move |value: AnyValue, outcome| match (value as Box<dyn Any>).downcast::<T>() {
            Ok(v) => {
                let fut = on_end(*v, outcome);
                Box::pin(async move { fut.await.map_err(Into::into) })
            }
            Err(_) => Box::pin(async { Err(BoxError::from("scoped value of the wrong type")) }),
        });
        self.register(Lifetime::Scoped, factory, Some(end))
    }

    /// Registers a transient: a fresh value at each request for it.
    pub fn transient<T: Send + Sync + 'static, Args>(self, factory: impl Handler<Args, T>) -> Self {
        self.register(Lifetime::Transient, factory, None)
    }

    /// Whether `T` is registered.
    pub fn contains<T: 'static>(&self) -> bool {
        self.regs.contains_key(&TypeId::of::<T>())
    }

    /// Checks `owner`'s needs and the whole graph below them: unregistered types, a lifetime asked for
    /// that differs from the registered one, captive dependencies and cycles. Errors name the chain.
    pub fn validate(&self, owner: &str, needs: &[Dependency]) -> Result<(), BuildError> {
        for need in needs {
            let mut path = Vec::new();
            self.check(owner, *need, None, &mut path)?;
        }
        Ok(())
    }

    fn check(
        &self,
        owner: &str,
        need: Dependency,
        parent: Option<Lifetime>,
        path: &mut Vec<(String, Lifetime)>,
    ) -> Result<(), BuildError> {
        let chain = |path: &[(String, Lifetime)], last: &str| {
            let mut text = format!("`{owner}` needs ");
            for (name, lifetime) in path {
                text.push_str(&format!("`{name}` ({}), which needs ", lifetime.as_str()));
            }
            text.push_str(&format!("`{last}`"));
            text
        };
        let Some(reg) = self.regs.get(&need.type_id) else {
            return Err(BuildError::Dependency(format!("{}: not registered", chain(path, &shorten(need.type_name)))));
        };
        if path.iter().any(|(name, _)| *name == reg.type_name) {
            return Err(BuildError::Dependency(format!("{}: dependency cycle", chain(path, &reg.type_name))));
        }
        if reg.lifetime != need.lifetime {
            return Err(BuildError::Dependency(format!(
                "{}: asked for as {}, but registered as {}",
                chain(path, &reg.type_name),
                need.lifetime.as_str(),
                reg.lifetime.as_str()
            )));
        }
        if parent == Some(Lifetime::Singleton) && reg.lifetime == Lifetime::Scoped {
            return Err(BuildError::Dependency(format!(
                "{} (scoped): a singleton cannot depend on a scoped service (captive dependency)",
                chain(path, &reg.type_name)
            )));
        }
        // A singleton reached through a transient inherits the singleton's restriction.
        let effective = match (parent, reg.lifetime) {
            (Some(Lifetime::Singleton), Lifetime::Transient) => Lifetime::Singleton,
            (_, l) => l,
        };
        path.push((reg.type_name.clone(), reg.lifetime));
        for dep in &reg.deps {
            self.check(owner, *dep, Some(effective), path)?;
        }
        path.pop();
        Ok(())
    }

    /// Validates every registration's own dependencies.
    pub(crate) fn validate_all(&self) -> Result<(), BuildError> {
        for id in &self.order {
            let reg = &self.regs[id];
            let owner = format!("{} {}", reg.lifetime.as_str(), reg.type_name);
            for dep in &reg.deps {
                let mut path = Vec::new();
                self.check(&owner, *dep, Some(reg.lifetime), &mut path)?;
            }
        }
        Ok(())
    }

    pub(crate) fn into_container(self) -> Arc<Container> {
        let singletons = self
            .order
            .iter()
            .filter(|id| self.regs[id].lifetime == Lifetime::Singleton)
            .map(|id| (*id, tokio::sync::OnceCell::new()))
            .collect();
        Arc::new(Container { regs: self.regs, order: self.order, singletons })
    }
}

/// The built registry, shared by every scope of a host.
pub(crate) struct Container {
    regs: HashMap<TypeId, Registration>,
    order: Vec<TypeId>,
    singletons: HashMap<TypeId, tokio::sync::OnceCell<Shared>>,
}

impl Container {
    pub(crate) fn empty() -> Arc<Self> {
        ServiceCollection::new().into_container()
    }

    /// Makes every singleton now, so a failing factory fails the start, naming the type.
    pub(crate) async fn init_singletons(self: &Arc<Self>, ctx: &ServiceContext) -> Result<(), (String, String)> {
        let scope = ctx.create_scope();
        debug_assert!(Arc::ptr_eq(scope.container(), self), "singletons are made in their own host's scope");
        for id in &self.order {
            let reg = &self.regs[id];
            if reg.lifetime == Lifetime::Singleton {
                resolve_singleton_erased(&scope, *id)
                    .await
                    .map_err(|e| (reg.type_name.to_string(), crate::host::error_chain(e.as_ref())))?;
            }
        }
        Ok(())
    }
}

fn not_registered<T>() -> BoxError {
    format!("`{}` is not registered", short_type_name::<T>()).into()
}

async fn resolve_singleton_erased(scope: &Scope, id: TypeId) -> Result<Shared, BoxError> {
    let container = scope.container().clone();
    let (Some(reg), Some(cell)) = (container.regs.get(&id), container.singletons.get(&id)) else {
        return Err("not registered as a singleton".into());
    };
    let value = cell.get_or_try_init(|| async { (reg.make)(scope).await.map(Shared::from) }).await?;
    Ok(value.clone())
}

/// One unit of work's resources: its service context, its scoped values, and typed extensions.
///
/// The host and its integrations create one per tick, task, job, message and request. Values are
/// made on first use and ended, in reverse order of creation, by [`Scope::close`].
///
/// ```
/// # async fn demo(ctx: stevedore::ServiceContext) -> Result<(), stevedore::BoxError> {
/// use stevedore::scope::Transient;
/// let scope = ctx.create_scope();
/// // explicit resolution, for custom loops:
/// let n: Transient<u32> = scope.get().await?;
/// # let _ = n;
/// scope.close(stevedore::RunOutcome::Succeeded).await?;
/// # Ok(()) }
/// ```
pub struct Scope {
    /// The registry is reached through the context: one reference count per scope, not two, which
    /// a queue of quick tasks feels.
    ctx: ServiceContext,
    values: Mutex<Vec<(TypeId, Shared)>>,
    /// Set once a scoped value is made: a run that made none skips its close without a lock.
    made_scoped: AtomicBool,
    /// Set once an extension is attached.
    extended: AtomicBool,
    extensions: Mutex<Vec<Box<dyn Any + Send + Sync>>>,
}

impl std::fmt::Debug for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scope").field("service", &self.ctx.name()).finish_non_exhaustive()
    }
}

impl Scope {
    pub(crate) fn new(ctx: ServiceContext) -> Self {
        Scope {
            ctx,
            values: Mutex::new(Vec::new()),
            made_scoped: AtomicBool::new(false),
            extended: AtomicBool::new(false),
            extensions: Mutex::new(Vec::new()),
        }
    }

    fn container(&self) -> &Arc<Container> {
        self.ctx.container()
    }

    /// The context of the service this scope runs in.
    pub fn context(&self) -> &ServiceContext {
        &self.ctx
    }

    /// Resolves any extractor: `scope.get::<Scoped<Db>>()`.
    pub async fn get<E: FromScope>(&self) -> Result<E, BoxError> {
        E::from_scope(self).await
    }

    /// Attaches a typed value (a job's metadata, a message's headers) that handlers extract with
    /// [`Extension`](crate::handler::Extension). A second value of the same type replaces the first.
    pub fn insert_extension<T: Clone + Send + Sync + 'static>(&self, value: T) {
        self.extended.store(true, Ordering::Release);
        let mut ext = self.extensions.lock().unwrap_or_else(|p| p.into_inner());
        ext.retain(|e| !e.is::<T>());
        ext.push(Box::new(value));
    }

    /// A copy of the extension of type `T`, if one was attached.
    pub fn extension<T: Clone + Send + Sync + 'static>(&self) -> Option<T> {
        let ext = self.extensions.lock().unwrap_or_else(|p| p.into_inner());
        ext.iter().find_map(|e| e.downcast_ref::<T>().cloned())
    }

    pub(crate) async fn singleton<T: Send + Sync + 'static>(&self) -> Result<Arc<T>, BoxError> {
        let id = TypeId::of::<T>();
        if !self.container().singletons.contains_key(&id) {
            return Err(not_registered::<T>());
        }
        let erased = resolve_singleton_erased(self, id).await?;
        erased.downcast::<T>().map_err(|_| not_registered::<T>())
    }

    pub(crate) async fn scoped<T: Send + Sync + 'static>(&self) -> Result<Arc<tokio::sync::Mutex<T>>, BoxError> {
        let id = TypeId::of::<T>();
        if let Some(existing) = self.find_scoped(id) {
            return existing.downcast::<tokio::sync::Mutex<T>>().map_err(|_| not_registered::<T>());
        }
        let reg = self
            .container()
            .regs
            .get(&id)
            .filter(|r| r.lifetime == Lifetime::Scoped)
            .ok_or_else(not_registered::<T>)?;
        let made = (reg.make)(self).await?;
        let value = (made as Box<dyn Any>).downcast::<T>().map_err(|_| not_registered::<T>())?;
        let shared = Arc::new(tokio::sync::Mutex::new(*value));
        let mut values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        // Another extraction may have made it meanwhile (factories can await): keep the first.
        if let Some((_, existing)) = values.iter().find(|(t, _)| *t == id) {
            return existing.clone().downcast::<tokio::sync::Mutex<T>>().map_err(|_| not_registered::<T>());
        }
        values.push((id, shared.clone()));
        self.made_scoped.store(true, Ordering::Release);
        Ok(shared)
    }

    pub(crate) async fn transient<T: Send + Sync + 'static>(&self) -> Result<T, BoxError> {
        let reg = self
            .container()
            .regs
            .get(&TypeId::of::<T>())
            .filter(|r| r.lifetime == Lifetime::Transient)
            .ok_or_else(not_registered::<T>)?;
        let made = (reg.make)(self).await?;
        (made as Box<dyn Any>).downcast::<T>().map(|b| *b).map_err(|_| not_registered::<T>())
    }

    fn find_scoped(&self, id: TypeId) -> Option<Shared> {
        let values = self.values.lock().unwrap_or_else(|p| p.into_inner());
        values.iter().find(|(t, _)| *t == id).map(|(_, v)| v.clone())
    }

    /// True when no scoped value was made, so closing has nothing to end: the common case of a
    /// run without scoped dependencies skips building the close future altogether.
    pub(crate) fn nothing_to_end(&self) -> bool {
        !self.made_scoped.load(Ordering::Acquire)
    }

    /// True when nothing was made in the scope or attached to it: it is then as good as a fresh
    /// one, and a loop may use it for its next unit of work instead of making another.
    pub(crate) fn is_pristine(&self) -> bool {
        self.nothing_to_end() && !self.extended.load(Ordering::Acquire)
    }

    /// Ends the scope: scoped values are ended in reverse order of creation, each end hook seeing
    /// `outcome`. Every hook runs even if one fails; the errors are returned together, never swallowed.
    pub async fn close(self, outcome: RunOutcome) -> Result<(), BoxError> {
        let values = std::mem::take(&mut *self.values.lock().unwrap_or_else(|p| p.into_inner()));
        let mut errors = Vec::new();
        for (id, value) in values.into_iter().rev() {
            let Some(reg) = self.container().regs.get(&id) else { continue };
            let Some(end) = &reg.end else { continue };
            match (reg.take_scoped)(value) {
                Some(inner) => {
                    if let Err(e) = end(inner, outcome).await {
                        errors.push(format!(
                            "ending `{}` failed: {}",
                            reg.type_name,
                            crate::host::error_chain(e.as_ref())
                        ));
                    }
                }
                None => errors.push(format!(
                    "ending `{}` failed: the value is still in use (a handler kept a clone of it past the run)",
                    reg.type_name
                )),
            }
        }
        if errors.is_empty() { Ok(()) } else { Err(errors.join("; ").into()) }
    }
}

/// A singleton: one for the host's life. Dereferences to `T`.
#[derive(Debug)]
pub struct Singleton<T>(pub(crate) Arc<T>);

impl<T> Singleton<T> {
    /// The shared value, to keep beyond the run.
    pub fn arc(&self) -> &Arc<T> {
        &self.0
    }
}

impl<T> Clone for Singleton<T> {
    fn clone(&self) -> Self {
        Singleton(self.0.clone())
    }
}

impl<T> Deref for Singleton<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// A scoped value: one per unit of work, shared by everything in that unit. Lock it to use it.
#[derive(Debug)]
pub struct Scoped<T>(pub(crate) Arc<tokio::sync::Mutex<T>>);

impl<T> Clone for Scoped<T> {
    fn clone(&self) -> Self {
        Scoped(self.0.clone())
    }
}

impl<T> Scoped<T> {
    /// Locks the value for this part of the run.
    pub async fn lock(&self) -> tokio::sync::MutexGuard<'_, T> {
        self.0.lock().await
    }
}

/// A transient: a fresh value owned by the parameter.
#[derive(Debug)]
pub struct Transient<T>(pub(crate) T);

impl<T> Transient<T> {
    /// The value.
    pub fn into_inner(self) -> T {
        self.0
    }
}

impl<T> Deref for Transient<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

impl<T> DerefMut for Transient<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.0
    }
}
